"""Layer 3 of anomalib-kd: tools above the models (benchmark, demo, generated data, DTD download, proxy teacher).

Imports ``anomalib_aand``, ``anomalib_memkd`` and ``anomalib_kd_base``; nothing below ever imports this package
(``tests/test_layering.py``). This ``__init__`` imports nothing.
"""
