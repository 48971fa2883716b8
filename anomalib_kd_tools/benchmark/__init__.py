"""``anomalib-kd-benchmark``: benchmarks of AAND and MemKD beside anomalib's models, one module per concern.

* ``quality`` (:mod:`.quality`): the side-by-side grid - :mod:`.generator` (the cells), :mod:`.runner` (one child
  process per cell), :mod:`.job` (one cell), :mod:`.quality_report`, :mod:`.paper_results` (the papers' numbers,
  ``data/papers.csv``); ``--ablation``: :mod:`.ablation` and :mod:`.ablation_report`.
* ``edge`` (:mod:`.edge`): CPU latency / throughput / AUROC per precision; ``speed`` (:mod:`.speed`): training step,
  memory and inference of AAND and MemKD relative to ReverseDistillation.
* Shared: :mod:`.cli` (the command), :mod:`.schema` (columns, CSV files, mean ± std over seeds, on pandas),
  :mod:`.report` (the common markdown header, tables, PNG), :mod:`.timing` (``torch.utils.benchmark.Timer``).

``benchmarks/gpu.sh`` runs ``quality`` and ``speed`` on a CUDA machine; docs/benchmarks.md has the protocol.
"""

from anomalib_kd_tools.benchmark.cli import main

__all__ = ["main"]
