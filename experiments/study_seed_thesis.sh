#!/usr/bin/env bash
# The seed thesis's study (Oreč 2021, Tesla T4): resnet18/34/50 x baseline/amp, SGD lr 0.1, momentum 0.9,
# batch 128, lr halved every 20 epochs, 50 epochs (60 for resnet50), on the 45k/5k/10k split. These are
# mixprec's defaults, so only the models, modes and epochs are given. Needs a CUDA GPU (amp is float16
# there); on a T4 the thesis took about 9 hours of training for the six runs.
#
#   bash experiments/study_seed_thesis.sh [--seeds 0 1 2] [--data PATH] [any other mixprec.run option]
#
# Writes results/seed-thesis/ (runs/, study.json, report/). Add --no-tf32 on Ampere or newer GPUs to keep
# the baseline true FP32 (the T4 has no TF32). Running it again continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"  # a plain `python` may be absent, or not the one with torch
"$PYTHON" -m mixprec.study --models resnet18 resnet34 --modes baseline amp --epochs 50 --device cuda \
    --out results/seed-thesis --no-report "$@"
"$PYTHON" -m mixprec.study --models resnet50 --modes baseline amp --epochs 60 --device cuda \
    --out results/seed-thesis "$@"
