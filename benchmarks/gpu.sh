#!/usr/bin/env bash
# benchmarks/gpu.sh - every GPU table of anomalib-kd in one run, for whoever is lent a CUDA machine.
#
#   bash scripts/setup_env.sh            # once: the repo's install (.venv); nothing else is needed
#   bash benchmarks/gpu.sh [OUTPUT]      # default OUTPUT: runs/gpu-<UTC date>-<time>
#   DRY_RUN=1 bash benchmarks/gpu.sh     # print the commands instead of running them (no CUDA needed)
#
# Without CUDA (and without DRY_RUN=1) it refuses to run. Everything runs on generated data; nothing is downloaded
# (HF_HUB_OFFLINE=1) and no teacher is pre-trained:
#   1. quality - `anomalib-kd-benchmark quality --generated`: Patchcore, ReverseDistillation, Aand and MemKD on the
#      same generated data (32 train / 20 test images, 30 % of the test images held out for the thresholds),
#      wide_resnet50_2 with random init (--no-pre-trained), 256 px, batch 16, seed 0, the papers' schedules scaled
#      by 1/10 (RD and MemKD 20 epochs, Aand 10 + 12 epochs; Patchcore one pass, coreset 0.1), OpenVINO off (a CPU
#      figure: `anomalib-kd-benchmark edge`)           -> OUTPUT/quality/results.{csv,md,png}, logs/
#   2. speed - `anomalib-kd-benchmark speed --device cuda`: wide_resnet50_2, 256 px, batch 16, MemKD N = 16; the
#      training step time and peak GPU memory of RD, AAND stage 1 (exact and subsampled L_A), stage 2 and MemKD,
#      then the inference latency of RD, Aand and MemKD in eager fp32 and on the fast path (fast_inference: fp16
#      autocast + channels-last, with its anomaly-map error; the speed tool times it for every model that has it,
#      there is no flag)                               -> OUTPUT/speed/speed.{md,json,png}, speed_{train,inference}.csv
# and then prints every table (also collected in OUTPUT/tables.md).
#
# Time on one H100 - an estimate, not yet measured, made conservatively:
#   quality: 4 cells, each <= 60 s: a fresh process and its imports (~15 s), building WRN50, 2 steps per epoch for
#            <= 22 epochs at <= 0.3 s per step, validation + test on 20 images, 20 + 5 timed forwards   <= 4 min
#   speed:   5 training configurations, one process each, <= 25 s each; inference <= 40 s          <= 2.7 min
#   total <= 7 min. QUALITY_TIMEOUT (default 250 s) and SPEED_TIMEOUT (default 160 s) cap the two steps: at its cap
#   a step gets SIGINT (to its whole process group, cells included) and KILL_AFTER (default 15 s) later SIGKILL, so
#   with the CUDA probe the script ends within 8 minutes whatever happens (250 + 15 + 160 + 15 + 30 s of set-up
#   <= 480 s; tests/tools/test_gpu_script.py checks the sum). An interrupted step still writes its tables from what
#   is done: quality from the finished cells in results.csv (the same command with the same OUTPUT resumes it), speed
#   from the finished training configurations and inference rows. Record the measured times (OUTPUT/timings.txt)
#   beside the tables.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
if [ ! -x "$python" ] && [ -z "${PYTHON:-}" ]; then
  python="$(command -v python3 || echo python3)"
fi
out="${1:-$here/runs/gpu-$(date -u +%Y%m%d-%H%M%S)}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac  # OUTPUT relative to where the script was started
cd "$here" || exit 2  # the repo root: relative defaults (AAND's ./datasets/dtd/images, runs/) are resolved from it
dry="${DRY_RUN:-0}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

bench=("$python" -m anomalib_kd_tools.benchmark)
quality=(
  "${bench[@]}" quality --generated --output "$out/quality"
  --models Patchcore ReverseDistillation Aand MemKD --seeds 0
  --backbone wide_resnet50_2 --no-pre-trained --image-size 256 --batch-size 16
  --epochs 20 --aand-stage-epochs 10 12 --coreset-ratio 0.1
  --n-train 32 --n-test-good 8 --n-test-per-defect 4
  --devices auto --num-workers 4 --no-openvino --timing-runs 20 --warmup 3 --throughput-batch 16
)
speed=(
  "${bench[@]}" speed --device cuda --output "$out/speed"
  --backbone wide_resnet50_2 --image-size 256 --batch-size 16 --exemplars 16 --steps 3 --runs 10
)
quality_cap="${QUALITY_TIMEOUT:-250}"
speed_cap="${SPEED_TIMEOUT:-160}"
kill_after="${KILL_AFTER:-15}"
capped() {  # capped SECONDS COMMAND...: SIGINT at the limit (the tools stop their children, write their tables
  local limit="$1"  # from what is done and exit 130), SIGKILL kill_after seconds later
  shift
  timeout -s INT -k "$kill_after" "$limit" "$@"
}

if [ "$dry" = "1" ]; then
  echo "# DRY_RUN=1: the commands benchmarks/gpu.sh runs (output: $out)"
  printf '%q ' timeout -s INT -k "$kill_after" "$quality_cap" "${quality[@]}"
  echo
  printf '%q ' timeout -s INT -k "$kill_after" "$speed_cap" "${speed[@]}"
  echo
  exit 0
fi

# The install first (its errors are shown as they are), then CUDA: a broken venv must not read as "no CUDA".
if ! probe="$("$python" -c "import torch, anomalib_kd_tools.benchmark; print('cuda', torch.cuda.is_available())" 2>&1)"; then
  echo "benchmarks/gpu.sh: $python cannot import torch / anomalib_kd_tools (missing venv or broken install):" >&2
  printf '%s\n' "$probe" | tail -n 15 >&2
  echo "Run 'bash scripts/setup_env.sh' first (or set PYTHON to the interpreter of the install)." >&2
  exit 2
fi
if [ "$(printf '%s\n' "$probe" | tail -n 1)" != "cuda True" ]; then
  echo "benchmarks/gpu.sh: no CUDA device visible to $python (torch.cuda.is_available() is False); refusing to run." >&2
  echo "Run 'bash scripts/setup_env.sh' on a CUDA machine first, or DRY_RUN=1 to print the commands." >&2
  exit 2
fi

mkdir -p "$out"
{ nvidia-smi -L 2>/dev/null || true; "$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"; } > "$out/gpu.txt"
: > "$out/timings.txt"
status=0
step() {  # step NAME SECONDS COMMAND...
  local name="$1" limit="$2" start code
  shift 2
  start=$(date +%s)
  echo "== $name: $*"
  capped "$limit" "$@" 2>&1 | tee "$out/$name.log"
  code=${PIPESTATUS[0]}
  echo "$name: exit $code, $(( $(date +%s) - start )) s (cap $limit s)" | tee -a "$out/timings.txt"
  [ "$code" -eq 0 ] || status=1
}
start_all=$(date +%s)
step quality "$quality_cap" "${quality[@]}"
step speed "$speed_cap" "${speed[@]}"
echo "total: $(( $(date +%s) - start_all )) s" | tee -a "$out/timings.txt"

tables=("$out/quality/results.md" "$out/speed/speed.md")
: > "$out/tables.md"
for table in "${tables[@]}"; do
  if [ -f "$table" ]; then
    cat "$table" >> "$out/tables.md"
    echo >> "$out/tables.md"
  else
    echo "missing: $table (see $out/*.log)" >> "$out/tables.md"
    status=1
  fi
done
echo
echo "================================ tables (also in $out/tables.md) ================================"
cat "$out/tables.md"
cat "$out/gpu.txt" "$out/timings.txt"
exit "$status"
