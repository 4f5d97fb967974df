#!/usr/bin/env bash
# The ablation study: what each technique of manual mode buys, what can replace FP32 master weights, and FP8 beside
# FP16. resnet20, a stratified 10,000-image training subset, 8 epochs, the full 10,000-image test set, with the
# cifar10 study's recipe (experiments/study_cifar10.sh). Writes results/ablation-study/ (runs/, report/).
#
# Key variants, at every seed (default 0-4: five seeds, so that the paired intervals can decide): FP32; manual FP16;
# without loss scaling; master weights none, stochastic and kahan (FP16); manual bfloat16 with fp32, none,
# stochastic and kahan master weights; FP8 with delayed and with current scaling. Two more, at seeds 0 and 1 only
# (as first run): a static loss scale of 2^10, and FP16 BatchNorm.
#
#   bash experiments/study_ablations.sh            # runs or continues it (hours on 2 CPU cores)
#   bash experiments/study_ablations.sh --plan     # only validates every mixprec.run command line and prints it
#
# Each variant is one python -m mixprec.study call, so OUT/study.json describes the last variant only; the run
# directories and the report (written once, at the end) hold them all. Run it again after an interruption:
# completed runs are skipped, an interrupted one resumes. DATA overrides the data path; SEEDS (default "0 1 2 3 4")
# the seeds, e.g. SEEDS=2 for the third alone.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/study_common.sh "$@"  # PYTHON, and STUDY: the study, or with --plan a check of it
OUT=results/ablation-study
read -r -a SEED_LIST <<< "${SEEDS:-0 1 2 3 4}"
COMMON=(--models resnet20 --epochs 8 --subset 10000 --device cpu
        --data "$DATA" --out "$OUT" --no-report)
VARIANTS=(
    "--modes baseline"
    "--modes manual"
    "--modes manual --loss-scale none"
    "--modes manual --master-weights none"
    "--modes manual --master-weights stochastic"
    "--modes manual --master-weights kahan"
    "--modes manual --manual-dtype bfloat16"
    "--modes manual --manual-dtype bfloat16 --master-weights none"
    "--modes manual --manual-dtype bfloat16 --master-weights stochastic"
    "--modes manual --manual-dtype bfloat16 --master-weights kahan"
    "--modes manual --fp8 delayed"
    "--modes manual --fp8 current"
)
FIRST_SEEDS_ONLY=(  # two seeds each, as the study first ran them
    "--modes manual --loss-scale 1024"
    "--modes manual --fp16-batchnorm"
)
# Seeds vary slowest, so an interrupted study leaves whole seeds.
for seed in "${SEED_LIST[@]}"; do
    variants=("${VARIANTS[@]}")
    [[ "$seed" == 0 || "$seed" == 1 ]] && variants+=("${FIRST_SEEDS_ONLY[@]}")
    for variant in "${variants[@]}"; do
        # shellcheck disable=SC2086  # a variant is several words on purpose
        "${STUDY[@]}" $variant --seeds "$seed" "${RESNET20_RECIPE[@]}" "${COMMON[@]}"
    done
done
if [[ "${1:-}" != --plan ]]; then
    "$PYTHON" -m mixprec.report "$OUT"
fi
