"""The README and docs/: every shell command is run by a test or by CI, or says what it needs; links resolve.

Every fenced shell block (```bash, ```sh, ```console, ```shell) in README.md and docs/*.md has, as the previous
non-blank line, exactly one marker:

* ``<!-- tested: tests/x/test_y.py::test_name[, more] -->``: each test exists (parsed with ``ast``), and for every
  command line of the block the referenced tests run that program: the program (``anomalib``, a console script, a
  ``python`` / ``bash`` script by file name, ``python -m`` module) is named by a string constant of the test or its
  module, or the test calls the entry point's ``main``; a subcommand (``anomalib train``, ``anomalib-kd-benchmark
  edge``, ``anomalib-kd-weights verify``) must be a string constant of the test function itself or of a fixture of
  its module that it requests.
* ``<!-- needs: GPU|weights|data[, ...] -->``: the command needs a GPU, pretrained weights or a dataset that CI does
  not have; each item may carry a parenthesised note, e.g. ``data (MVTec AD)``.
* ``<!-- ci -->``: what ``.ci/run`` or ``scripts/`` run; every command (for ``bash X``: the path ``X``) is
  ``.ci/run`` itself or appears in ``.ci/run`` or a file of ``scripts/``.

Also: every fenced block names its language (a shell command cannot hide in an unlabelled block), a marker is
followed by a shell block, README.md has at most 150 lines, relative links (and their ``#anchors``) resolve, and the
old names (``benchmarks/edge.py``, ``benchmarks/speed.py``, the ``anomalib_kd`` package) are gone.
Commands in inline code spans are not checked.
"""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = {"bash", "sh", "console", "shell"}
NEEDS = ("GPU", "weights", "data")
MARKER = re.compile(r"^<!--\s*(?P<kind>tested|needs|ci)\b\s*(?::\s*(?P<value>.*?))?\s*-->$")
ANY_MARKER = re.compile(r"^<!--\s*(tested|needs|ci)\b")
NEEDS_ITEM = re.compile(r"^(?P<what>\w+)(\s*\([^()]*\))?$")
SUBCOMMAND_PROGRAMS = {"anomalib", "anomalib-kd-weights", "anomalib-kd-benchmark"}
#: console scripts this checker knows besides the project's own (pyproject's [project.scripts])
EXTERNAL_SCRIPTS = {"anomalib": "anomalib.cli.cli"}
README_MAX_LINES = 150
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------------------------- markdown
@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    body: list[str]
    marker: str | None  # the previous non-blank line when it is a marker comment
    markers_before: int  # consecutive marker comments right before the fence


def fenced_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        stripped = lines[index].strip()
        if not stripped.startswith("```"):
            index += 1
            continue
        fence = re.match(r"`{3,}", stripped).group(0)
        language = stripped[len(fence) :].strip().split(" ")[0].lower()
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index])
            index += 1
        previous = [line.strip() for line in lines[:start] if line.strip()]
        count = 0
        for line in reversed(previous):
            if not ANY_MARKER.match(line):
                break
            count += 1
        marker = previous[-1] if previous and ANY_MARKER.match(previous[-1]) else None
        blocks.append(Block(start + 1, language, body, marker, count))
        index += 1
    return blocks


def dangling_markers(text: str) -> list[int]:
    """Lines of marker comments whose next non-blank line is not a shell fence (or another marker)."""
    lines = text.splitlines()
    out = []
    for number, line in enumerate(lines):
        if not ANY_MARKER.match(line.strip()):
            continue
        following = next((other.strip() for other in lines[number + 1 :] if other.strip()), "")
        language = following[3:].strip().split(" ")[0].lower() if following.startswith("```") else None
        if language not in SHELL_LANGUAGES and not ANY_MARKER.match(following):
            out.append(number + 1)
    return out


# ---------------------------------------------------------------------------------------------- commands
def command_lines(block: Block) -> list[str]:
    """Logical command lines: continuations joined, comments and (for console blocks) output dropped."""
    joined: list[str] = []
    pending = ""
    for raw in block.body:
        line = raw.rstrip()
        if block.language == "console" and not pending:
            if not line.lstrip().startswith("$ "):
                continue
            line = line.lstrip()[2:]
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            joined.append(line.strip())
    if pending.strip():
        joined.append(pending.strip())
    return joined


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line: split at ; && || | &, keywords and VAR=value prefixes dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    commands: list[list[str]] = [[]]
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token in {";", "&&", "||", "|", "&", ";;"}:
            commands.append([])
        elif token in {"<", ">", ">>", "2>", "&>"}:
            skip_next = True
        else:
            commands[-1].append(token)
    out = []
    for words in commands:
        while words and (words[0] in {"do", "then", "else", "time"} or re.match(r"^[A-Za-z_]\w*=", words[0])):
            words = words[1:]
        if not words or words[0] in {"for", "while", "if", "done", "fi", "esac"}:
            continue
        out.append(words)
    return out


def program_of(words: list[str]) -> tuple[str, tuple[str, ...]]:
    """``(program, subcommands)``: a script by file name, a ``-m`` module, or a command and its subcommand."""
    first = words[0]
    name = first.rsplit("/", 1)[-1]
    if re.fullmatch(r"python(3(\.\d+)?)?", name) and len(words) > 1:
        if words[1] == "-m" and len(words) > 2:
            return words[2], ()
        return words[1].rsplit("/", 1)[-1], ()
    if name in {"bash", "sh"} and len(words) > 1:
        return words[1].rsplit("/", 1)[-1], ()
    if first in SUBCOMMAND_PROGRAMS and len(words) > 1 and not words[1].startswith("-"):
        return first, (words[1],)
    return first, ()


@cache
def console_scripts() -> dict[str, str]:
    """Console script name -> the module whose ``main`` it runs."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    return {**EXTERNAL_SCRIPTS, **{name: target.split(":")[0] for name, target in scripts.items()}}


# ---------------------------------------------------------------------------------------------- tests
@dataclass
class ReferencedTest:
    function: ast.Module  # the test function and the fixtures of its module that it requests (transitively)
    module: ast.Module
    imports: dict[str, str]  # local name -> module (or module.attribute) it names


def _is_fixture(node: ast.AST) -> bool:
    return any("fixture" in ast.unparse(decorator) for decorator in getattr(node, "decorator_list", []))


def _with_fixtures(function: ast.FunctionDef, module: ast.Module) -> ast.Module:
    """``function`` and the module-level fixtures it requests by argument name, and theirs."""
    fixtures = {n.name: n for n in module.body if isinstance(n, ast.FunctionDef) and _is_fixture(n)}
    bodies, todo = [function], [function]
    while todo:
        for arg in todo.pop().args.args:
            fixture = fixtures.get(arg.arg)
            if fixture is not None and fixture not in bodies:
                bodies.append(fixture)
                todo.append(fixture)
    return ast.Module(body=bodies, type_ignores=[])


def _imports(tree: ast.AST) -> dict[str, str]:
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def find_test(reference: str) -> ReferencedTest | str:
    """The test ``path::name`` (or ``path::Class::name``), or why it cannot be used."""
    path, _, name = reference.strip().partition("::")
    if not name:
        return f"{reference!r} is not <file>::<test>"
    file = REPO / path
    if not file.is_file():
        return f"{path} does not exist"
    module = ast.parse(file.read_text())
    scope: ast.AST = module
    *classes, function = name.split("::")
    for class_name in classes:
        scope = next((n for n in scope.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
        if scope is None:
            return f"{path} has no class {class_name}"
    found = next(
        (n for n in scope.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == function), None
    )
    if found is None or not function.startswith("test"):
        return f"{path} defines no test function {function}"
    return ReferencedTest(_with_fixtures(found, module), module, _imports(module))


def _strings(tree: ast.AST) -> set[str]:
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def _calls_main_of(test: ReferencedTest, module: str) -> bool:
    imports = {**test.imports, **_imports(test.function)}
    for node in ast.walk(test.function):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "main" and isinstance(func.value, ast.Name):
            if imports.get(func.value.id) == module:
                return True
        if isinstance(func, ast.Name) and imports.get(func.id) == f"{module}.main":
            return True
    return False


def runs_program(tests: list[ReferencedTest], program: str, subcommands: tuple[str, ...]) -> bool:
    def named(strings: set[str]) -> bool:
        return program in strings or any(s.endswith("/" + program) for s in strings)

    module = console_scripts().get(program)
    found = any(named(_strings(t.function)) or named(_strings(t.module)) for t in tests)
    if not found and module is not None:
        found = any(module in _strings(t.function) or _calls_main_of(t, module) for t in tests)
    function_strings = set().union(*(_strings(t.function) for t in tests))
    return found and all(sub in function_strings for sub in subcommands)


# ---------------------------------------------------------------------------------------------- checker
@cache
def _ci_text() -> str:
    files = [REPO / ".ci" / "run", *sorted(p for p in (REPO / "scripts").rglob("*") if p.is_file())]
    return "\n".join(p.read_text() for p in files)


def check_block(block: Block, ci_text: str | None = None) -> list[str]:
    where = f"line {block.line}"
    if block.markers_before != 1 or block.marker is None:
        return [f"{where}: shell block needs exactly one marker (tested: / needs: / ci) right before it, "
                f"found {block.markers_before}"]  # fmt: skip
    match = MARKER.match(block.marker)
    if match is None:
        return [f"{where}: malformed marker {block.marker!r}"]
    kind, value = match["kind"], (match["value"] or "").strip()
    commands = [words for line in command_lines(block) for words in simple_commands(line)]
    if not commands:
        return [f"{where}: shell block without a command"]
    problems = []
    if kind == "needs":
        items = [item.strip() for item in value.split(",")] if value else []
        if not items:
            problems.append(f"{where}: 'needs:' names nothing (one of {', '.join(NEEDS)})")
        for item in items:
            what = NEEDS_ITEM.match(item)
            if what is None or what["what"] not in NEEDS:
                problems.append(f"{where}: 'needs: {item}' is not one of {', '.join(NEEDS)} (with an optional note)")
    elif kind == "ci":
        if value:
            problems.append(f"{where}: 'ci' takes no value")
        text = _ci_text() if ci_text is None else ci_text
        for words in commands:
            wanted = words[1] if words[0] in {"bash", "sh"} and len(words) > 1 else " ".join(words)
            if wanted != ".ci/run" and wanted not in text:  # .ci/run is CI's entry point itself
                problems.append(f"{where}: {' '.join(words)!r} is not what .ci/run or scripts/ run")
    else:
        references = [r for r in value.split(",") if r.strip()]
        if not references:
            return [f"{where}: 'tested:' names no test"]
        tests = []
        for reference in references:
            found = find_test(reference)
            if isinstance(found, str):
                problems.append(f"{where}: {found}")
            else:
                tests.append(found)
        if tests and not problems:
            for words in commands:
                program, subcommands = program_of(words)
                if not runs_program(tests, program, subcommands):
                    shown = " ".join((program, *subcommands))
                    problems.append(f"{where}: no referenced test runs {shown!r} ({value})")
    return problems


def github_anchors(text: str) -> set[str]:
    anchors = set()
    in_fence = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
        if in_fence or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        title = re.sub(r"[`*_]", "", title)
        anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def check_markdown(text: str, path: Path, ci_text: str | None = None) -> list[str]:
    problems = []
    for block in fenced_blocks(text):
        if not block.language:
            problems.append(f"line {block.line}: fenced block without a language")
        elif block.language in SHELL_LANGUAGES:
            problems.extend(check_block(block, ci_text))
    problems.extend(f"line {n}: marker not followed by a shell block" for n in dangling_markers(text))
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    for match in LINK.finditer(prose):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        if not file_part:  # a heading of this document
            if anchor not in github_anchors(text):
                problems.append(f"link {target!r}: no heading #{anchor} in {path.name}")
            continue
        resolved = (path.parent / file_part).resolve()
        if not resolved.exists():
            problems.append(f"link {target!r}: {file_part} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in github_anchors(resolved.read_text()):
            problems.append(f"link {target!r}: no heading #{anchor} in {resolved.name}")
    return problems


def metadata_keys() -> set[str]:
    """``anomalib_kd.<key>`` metadata names (exports, weights files): not references to the old package."""
    tree = ast.parse((REPO / "anomalib_kd_base" / "weights.py").read_text())
    keys = {"model"}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "PROVENANCE_KEYS":
                keys.update(ast.literal_eval(node.value))
            elif node.targets[0].id in {"FILE_TAG_KEY", "FILE_BACKBONE_KEY"}:
                keys.add(ast.literal_eval(node.value).split(".", 1)[1])
    return {f"anomalib_kd.{key}" for key in keys}


def stale_names(text: str, allowed: set[str]) -> list[str]:
    found = [name for name in ("benchmarks/edge.py", "benchmarks/speed.py") if name in text]
    found += [m.group(0) for m in re.finditer(r"\banomalib_kd\.\w+", text) if m.group(0) not in allowed]
    found += [m.group(0) for m in re.finditer(r"\b(?:from|import) anomalib_kd\b(?!_)", text)]
    return found


# ---------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_commands_are_tested_ci_or_marked_and_links_resolve(path: Path) -> None:
    problems = check_markdown(path.read_text(), path)
    assert not problems, f"{path.relative_to(REPO)}:\n" + "\n".join(problems)


def test_every_doc_has_shell_blocks_checked() -> None:
    """The checker sees the blocks: README and the split-out docs hold marked shell blocks."""
    counted = {p.name: sum(b.language in SHELL_LANGUAGES for b in fenced_blocks(p.read_text())) for p in doc_files()}
    assert counted["README.md"] >= 4, counted
    assert sum(counted.values()) >= 15, counted


def test_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)


def test_old_names_are_gone() -> None:
    allowed = metadata_keys()
    assert "anomalib_kd.weights_tag" in allowed and "anomalib_kd.model" in allowed
    for path in doc_files():
        assert not stale_names(path.read_text(), allowed), (path.name, stale_names(path.read_text(), allowed))


# ---------------------------------------------------------------------------------------------- the checker fails
BAD_DOC = """# Demo

Some text.

```bash
anomalib-kd-weights verify teacher.safetensors
```

<!-- tested: tests/base/test_weights.py::test_there_is_no_such_test -->
```bash
anomalib-kd-weights verify teacher.safetensors
```

<!-- tested: tests/base/test_weights.py::test_weights_command_round_trip -->
```bash
anomalib-kd-benchmark edge --quick
```

<!-- tested: tests/nowhere.py::test_x -->
```sh
anomalib train --model Aand
```

<!-- needs: GPU, a fast laptop -->
```bash
anomalib train --model Aand --trainer.devices 4
```

<!-- ci -->
```bash
bash scripts/not_a_script.sh
```

<!-- ci -->
<!-- needs: data -->
```bash
bash scripts/run_tests.sh
```

```
pip install anomalib-kd
```

<!-- needs: data -->
Not a block.

See [the export guide](docs/nowhere.md) and [a heading](#no-such-heading).
"""

GOOD_DOC = """# Demo

## Offline

<!-- tested: tests/base/test_weights.py::test_weights_command_round_trip -->
```bash
# comment lines are skipped
anomalib-kd-weights export --backbone resnet18 --no-pretrained \\
    --output teacher.safetensors
anomalib-kd-weights verify teacher.safetensors
```

<!-- needs: GPU, data (MVTec AD), weights (ImageNet teacher) -->
```bash
anomalib train --model Aand --trainer.strategy ddp --trainer.devices 4
```

<!-- ci -->
```bash
bash scripts/run_tests.sh
```

```python
print("not a shell block")
```

See [offline](#offline).
"""


def test_checker_reports_each_kind_of_problem(tmp_path: Path) -> None:
    problems = check_markdown(BAD_DOC, tmp_path / "README.md", ci_text="bash scripts/run_tests.sh")
    text = "\n".join(problems)
    assert "line 5: shell block needs exactly one marker" in text and "found 0" in text  # missing marker
    assert "defines no test function test_there_is_no_such_test" in text  # bad tested: reference
    assert "no referenced test runs 'anomalib-kd-benchmark edge'" in text  # the test runs another program
    assert "tests/nowhere.py does not exist" in text
    assert "'needs: a fast laptop' is not one of GPU, weights, data" in text
    assert "'bash scripts/not_a_script.sh' is not what .ci/run or scripts/ run" in text
    assert "found 2" in text  # two markers before one block
    assert "fenced block without a language" in text
    assert "marker not followed by a shell block" in text
    assert "docs/nowhere.md does not exist" in text and "no heading #no-such-heading" in text
    assert len(problems) == 11, problems


def test_checker_accepts_a_correct_document(tmp_path: Path) -> None:
    assert check_markdown(GOOD_DOC, tmp_path / "README.md", ci_text="bash scripts/run_tests.sh") == []


def test_subcommand_must_be_run_by_the_test_itself() -> None:
    """`anomalib-kd-weights verify` is run by test_weights_command_round_trip, `anomalib predict` is not."""
    (weights,) = [find_test("tests/base/test_weights.py::test_weights_command_round_trip")]
    assert runs_program([weights], "anomalib-kd-weights", ("verify",))
    assert runs_program([weights], "anomalib-kd-weights", ("export",))
    assert not runs_program([weights], "anomalib", ("predict",))
    assert program_of(["python", "examples/foreground_preview.py", "--images", "x"]) == ("foreground_preview.py", ())
    assert program_of(["anomalib-kd-benchmark", "--generated"]) == ("anomalib-kd-benchmark", ())
    assert simple_commands('for s in 0 1; do OMP_NUM_THREADS=1 python b/a.py --out /tmp/s$s --models "A B"; done') == [
        ["python", "b/a.py", "--out", "/tmp/s$s", "--models", "A B"]
    ]


def test_old_names_are_detected() -> None:
    allowed = metadata_keys()
    text = "python benchmarks/edge.py; from anomalib_kd import weights; anomalib_kd.proxy; {'anomalib_kd.model': 1}"
    assert stale_names(text, allowed) == ["benchmarks/edge.py", "anomalib_kd.proxy", "from anomalib_kd"]
