"""User docs speak of topics: no heading or sentence in README.md or docs/ names an issue (by number or as "the ...
issue"), which means nothing to a user; the evidence stays under topic names."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ISSUE = re.compile(r"(?i)\bissues?\s*#?\s*\d+|(?<![\w/&])#\d+\b|\b(?:the|this|that)\s+[\w-]+\s+issue'?s?\b")


def test_no_user_doc_names_an_issue() -> None:
    docs = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in docs
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if ISSUE.search(line)
    ]
    assert not found, "user docs name issues:\n" + "\n".join(found)


def test_the_pattern_catches_what_it_must() -> None:
    for text in ("AAND on textured products (issue 18)", "see #24", "Issues 22 and 23", "the export issue's targets"):
        assert ISSUE.search(text), text
    for text in ("[parity](export.md#parity)", "a GitHub issue thread", "`issues` command", "color #fff"):
        assert not ISSUE.search(text), text
