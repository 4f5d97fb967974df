#!/usr/bin/env bash
# The GPU check, prepared for the day a machine with an NVIDIA GPU is at hand (mixprec is built on CPUs).
# About 5-8 minutes on one modern GPU. Writes OUT/summary.md (default results/gpu-check/) with:
#   1. the CUDA-marked tests (python -m pytest -m cuda);
#   2. native FP16 kernels against the emulated tensor-core arithmetic, per layer type;
#   3. one short resnet18 run per mode (2 epochs, full data), with the speedup and memory ratios against FP32
#      beside the seed thesis's T4 figures (Orec 2021: 3593 s / 707 MB FP32 against 1793 s / 445 MB AMP).
#
#   bash experiments/gpu_check.sh [OUT] [path to CIFAR-10; default ../shared/data/cifar10-jpeg.tar.gz if present,
#                                        else MIXPREC_DATA / torchvision's download]
#
# PYTHON names the interpreter (default python3: the GPU image has no plain `python`).
# Without a CUDA GPU, or without torch in that interpreter, it stops at once with exit code 2 and writes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"  # a plain `python` may be absent, or not the one with torch
OUT="${1:-results/gpu-check}"
DATA="${2:-}"
if [[ -z "$DATA" && -e ../shared/data/cifar10-jpeg.tar.gz ]]; then DATA=../shared/data/cifar10-jpeg.tar.gz; fi

if ! "$PYTHON" - <<'PY'
import sys
try:
    import torch
except ImportError:
    sys.exit(f"gpu_check.sh: {sys.executable} has no torch; set PYTHON to the interpreter that has it")
if not torch.cuda.is_available():
    why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
    sys.exit(f"gpu_check.sh: {why} (torch {torch.__version__}); run it on a machine with an NVIDIA GPU")
PY
then
    exit 2
fi

mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
TMP="$SUMMARY.tmp"
{
    echo "# GPU check"
    echo
    "$PYTHON" -c "import torch; print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, $(date -u +%Y-%m-%dT%H:%MZ)')"
    echo
    echo "## 1. CUDA-marked tests"
    echo
    echo '```'
    "$PYTHON" -m pytest -q -m cuda tests 2>&1 | tail -n 15 || true
    echo '```'
    echo
    echo "## 2. Native FP16 kernels against the emulation, per layer type"
    echo
    "$PYTHON" experiments/half_agreement.py --device cuda || true
    echo
    echo "## 3. resnet18, 2 epochs on the 45,000 training images, one run per mode"
    echo
} > "$TMP"

"$PYTHON" -m mixprec.study --models resnet18 --modes baseline amp manual --seeds 0 --epochs 2 --device cuda \
    ${DATA:+--data "$DATA"} --out "$OUT/study" || echo "(a run failed: see $OUT/study/study.json)" >> "$TMP"

"$PYTHON" - "$OUT/study/report/comparison.csv" >> "$TMP" <<'PY'
import sys
import pandas as pd
rows = pd.read_csv(sys.argv[1])
print("| mode | train time (s) | speedup vs FP32 | peak memory (MiB) | memory vs FP32 | test accuracy (%) |")
print("|---|---|---|---|---|---|")
for r in rows.itertuples():
    print(f"| {r.mode} | {r.train_time_s_mean:.1f} | {r.speedup_vs_baseline:.2f}x | {r.peak_memory_mib_mean:.0f} | "
          f"{r.memory_ratio_vs_baseline:.2f} | {100 * r.test_accuracy_mean:.2f} |")
print("| seed thesis, T4, AMP vs FP32 (50 epochs) | 1793 vs 3593 | 2.00x | 445 vs 707 MB | 0.63 | 83.67 vs 83.61 |")
print()
print("Two epochs say nothing about accuracy; the ratios are what to check. See docs/gpu.md for what to expect.")
PY
mv "$TMP" "$SUMMARY"
echo "wrote $SUMMARY"
