"""AAND for anomalib: advancing the pre-trained teacher (anomaly amplification + normality distillation).

``Aand`` is registered in the ``anomalib.models`` entry-point group, so after ``pip install
anomalib-kd`` the stock ``anomalib train --model Aand`` and ``anomalib.models.get_model("aand")`` work.
"""

from .lightning_model import Aand
from .torch_model import AandModel

__all__ = ["Aand", "AandModel"]
