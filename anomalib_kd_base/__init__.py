"""Layer 1 of anomalib-kd: the base that both model packages import. It imports neither model, only anomalib.

Modules: ``weights`` (teacher weights, provenance), ``export``, ``quantization`` (INT8 PTQ), ``distributed`` (DDP),
``fast`` (opt-in fast eval path), ``resume`` and ``checks`` (interruption and bad data), ``upstream`` (all workarounds
that rely on anomalib / Lightning internals), ``model`` (the Lightning base class of both models). The layers:
docs/development.md (``tests/test_layering.py`` fails on an upward import). This ``__init__`` imports nothing.
"""
