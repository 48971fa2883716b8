"""``python -m anomalib_kd_tools.benchmark``: the ``anomalib-kd-benchmark`` command."""

import sys

from anomalib_kd_tools.benchmark.cli import main

sys.exit(main())
