#!/usr/bin/env bash
# The ablation study of issue 17: what each technique of manual mode buys, and FP8 beside FP16. resnet20, seeds 0
# and 1, a stratified 10,000-image training subset, 8 epochs, the full 10,000-image test set; one variant per row:
# FP32; manual FP16; without loss scaling; static loss scale 2^10; without master weights; FP16 BatchNorm; manual
# bfloat16; FP8 with delayed scaling; FP8 with current scaling. Writes results/ablation-study/ (runs/, report/).
#
#   bash experiments/study_ablations.sh            # runs it (hours on 2 CPU cores)
#   bash experiments/study_ablations.sh --plan     # only validates every mixprec.run command line and prints it
#
# The recipe is the cifar10 study's (experiments/study_cifar10.sh). Each variant is one python -m mixprec.study
# call, so OUT/study.json describes the last variant only; the run directories and the report (written once, at
# the end) hold them all. Run it again after an interruption: completed runs are skipped, an interrupted one
# resumes. DATA overrides the data path; SEEDS (default "0 1") the seeds, e.g. SEEDS=1 for the second alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"  # a plain `python` may be absent, or not the one with torch
STUDY=("$PYTHON" -m mixprec.study)
if [[ "${1:-}" == --plan ]]; then
    STUDY=("$PYTHON" -c 'import sys
from mixprec.config import parse_args
from mixprec.study import plan
_, combos = plan(sys.argv[1:])
for c in combos:
    parse_args(c.argv)
    print("python -m mixprec.run", " ".join(c.argv))')
fi
OUT=results/ablation-study
RECIPE=(--schedule cosine --warmup-epochs 1 --lr 0.2 --nesterov --momentum 0.9 --weight-decay 5e-4
        --batch-size 64 --label-smoothing 0.1 --crop-padding 2 --test-time-flip)
read -r -a SEED_LIST <<< "${SEEDS:-0 1}"
COMMON=(--models resnet20 --epochs 8 --subset 10000 --device cpu
        --data "${DATA:-../shared/data/cifar10-jpeg.tar.gz}" --out "$OUT" --no-report)
VARIANTS=(
    "--modes baseline"
    "--modes manual"
    "--modes manual --loss-scale none"
    "--modes manual --loss-scale 1024"
    "--modes manual --master-weights none"
    "--modes manual --fp16-batchnorm"
    "--modes manual --manual-dtype bfloat16"
    "--modes manual --fp8 delayed"
    "--modes manual --fp8 current"
)
# Seeds vary slowest, so an interrupted study leaves whole seeds: seed 0's nine rows before any of seed 1's.
for seed in "${SEED_LIST[@]}"; do
    for variant in "${VARIANTS[@]}"; do
        # shellcheck disable=SC2086  # a variant is several words on purpose
        "${STUDY[@]}" $variant --seeds "$seed" "${RECIPE[@]}" "${COMMON[@]}"
    done
done
if [[ "${1:-}" != --plan ]]; then
    "$PYTHON" -m mixprec.report "$OUT"
fi
