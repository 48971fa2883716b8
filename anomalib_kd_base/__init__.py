"""Layer 1 of anomalib-kd: the base that both model packages import. It imports neither model.

Layers, imports only downward (``tests/test_layering.py`` fails on an upward import)::

    anomalib_kd_tools   benchmark, demo, data generation, proxy teacher   imports the models and the base
    anomalib_aand       AAND (anomalib model folder layout)                imports the base
    anomalib_memkd      MemKD (anomalib model folder layout)               imports the base
    anomalib_kd_base    weights, export, quantization, distributed, fast,  imports anomalib only
                        resume, checks, upstream, shared model boilerplate

Modules: ``weights`` (teacher weights: timm tag, local files, provenance, the ``anomalib-kd-weights`` command),
``export`` (provenance in checkpoints and exported models), ``quantization`` (INT8 PTQ), ``distributed`` (DDP),
``fast`` (opt-in fast eval path), ``resume`` and ``checks`` (interruption and bad-data handling), ``upstream`` (the
workarounds that rely on anomalib / Lightning internals, all of them), ``model`` (the Lightning base class and
argument checks of both models). ``distributed`` and ``resume`` hold the Lightning callbacks the base adds. This
``__init__`` imports nothing.
"""
