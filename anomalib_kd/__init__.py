"""Tooling shared by the anomalib-kd distribution: offline demo data, the demo and benchmarks.

The model packages (``anomalib_aand``, ``anomalib_memkd``) do not import this package.
"""
