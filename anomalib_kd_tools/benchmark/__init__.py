"""``anomalib-kd-benchmark``: benchmarks of AAND and MemKD beside anomalib's models, one module per concern.

* :mod:`.cli` - the command: subcommands ``quality``, ``edge`` and ``speed``; no subcommand means ``quality``.
* ``quality`` - :mod:`.quality` (options, the run), :mod:`.quality_report` (``results.md`` / ``results.png``),
  :mod:`.generator` (the grid of cells), :mod:`.runner` (devices, one child process per cell), :mod:`.job` (one
  cell: build, train, test, time), :mod:`.ablation` (``--ablation``: options and variants) with
  :mod:`.ablation_report` (its ``results.md`` / ``results.png``) and :mod:`.paper_results` (the papers' published
  numbers, packaged as ``data/papers.csv``, beside the measured ones). The proxy teacher is
  :mod:`anomalib_kd_tools.proxy`'s, the mechanism figures :mod:`anomalib_kd_tools.mechanisms`'.
* ``edge`` - :mod:`.edge`: CPU latency / throughput and image AUROC per precision (torch, OpenVINO FP32 / FP16 /
  INT8 / default).
* ``speed`` - :mod:`.speed`: training step time, peak memory and inference latency (eager, fast path, OpenVINO)
  of AAND and MemKD relative to ReverseDistillation.
* :mod:`.schema` - the data layer of all three (pandas): the columns and metrics, the CSV files, mean ± std over
  seeds; :mod:`.report` - the markdown (same header, ``to_markdown``) and PNG writer; :mod:`.timing` - the one timer
  (``torch.utils.benchmark.Timer``).

``benchmarks/gpu.sh`` runs ``quality`` and ``speed`` on a CUDA machine and collects every table.
"""

from anomalib_kd_tools.benchmark.cli import main

__all__ = ["main"]
