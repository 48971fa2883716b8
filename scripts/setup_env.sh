#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install anomalib-kd into it.
#   VENV      where the environment lives        (default: .venv in the repository)
#   EXTRAS    pip extras to install               (default: openvino)
# torch/torchvision are pinned explicitly first: on machines with a torch constraint file
# (CPU-only torch 2.13 wheels next to PyPI) letting pip resolve them picks incompatible builds.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$here/.venv}"
extras="${EXTRAS:-openvino}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip_install() { "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip_install --upgrade pip
pip_install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
pip_install -e "$here[$extras]"
"$venv/bin/python" -c "import anomalib_aand, anomalib_memkd, anomalib; print('anomalib-kd installed in', '$venv', '(anomalib', anomalib.__version__ + ')')"
