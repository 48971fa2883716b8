"""Tooling shared by the anomalib-kd distribution: offline demo data, the demo and benchmarks.

The model packages (``anomalib_aand``, ``anomalib_memkd``) import only its model-side modules: ``weights`` (teacher
weights: timm tag, local files, provenance, the ``anomalib-kd-weights`` command), ``export`` (provenance in
checkpoints and exported models) and ``quantization``. This ``__init__`` imports nothing.
"""
