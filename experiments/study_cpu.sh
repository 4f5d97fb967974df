#!/usr/bin/env bash
# The CPU-sized smoke study: resnet20 in baseline, amp (float16 + GradScaler, emulated) and manual mode, 3 seeds, 3 epochs on a
# stratified 5,000 of the 45,000 training images, evaluated on stratified 1,000-image subsets of the
# validation and test sets. Writes results/cpu-study/ (runs/, study.json, report/).
#
#   bash experiments/study_cpu.sh [path to CIFAR-10, default ../shared/data/cifar10-jpeg.tar.gz]
#
# Run it again after an interruption: completed runs are skipped and an interrupted one is resumed.
# The committed results/cpu-study/ was made before amp became float16 on a CPU: its amp rows are bfloat16
# autocast (labelled so in its report), which took ~12x FP32's time on the AVX2 EPYC it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"  # a plain `python` may be absent, or not the one with torch
"$PYTHON" -m mixprec.study --models resnet20 --modes baseline amp manual --seeds 0 1 2 \
    --epochs 3 --subset 5000 --test-subset 1000 --device cpu \
    --data "${1:-../shared/data/cifar10-jpeg.tar.gz}" --out results/cpu-study
