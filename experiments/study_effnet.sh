#!/usr/bin/env bash
# The EfficientNet study: what loss scaling buys efficientnet_b0, the one model here whose gradients the scaler
# had to act on, layer by layer. efficientnet_b0, a stratified 10,000-image training subset, 4 epochs, the full
# 10,000-image test set, with the recipe chosen on validation accuracy by the probes in results/effnet-probes/
# (results/README.md): peak lr 0.03, cosine with one warm-up epoch, Nesterov momentum 0.9, weight decay 5e-5,
# batch 64, label smoothing 0.1, 2-pixel crops, test-time flips. Writes results/effnet-study/ (runs/, report/).
#
# Variants, at every seed (default 0 1 2): FP32; amp (autocast FP16 + GradScaler); manual; manual without loss
# scaling (--loss-scale none); manual with a static scale of 2^10. Every run measures each layer's output and
# weight gradients every 40 steps (--layer-stats-every 40: layer_grads.csv, and the report's heatmaps; about 1%
# of the training time, experiments/bench_layer_stats.py).
#
# Then a control, in results/effnet-study-resnet20/: resnet20 under the ablation study's protocol (10,000 images,
# 8 epochs, RESNET20_RECIPE), manual with and without loss scaling, seed 0, with the same per-layer statistics:
# where FP16 loses resnet20's gradients without a scale, for the model whose accuracy did not need one.
#
#   bash experiments/study_effnet.sh            # runs or continues it (about 12 minutes a run on one core)
#   bash experiments/study_effnet.sh --plan     # only validates every mixprec.run command line and prints it
#
# Run it again after an interruption: completed runs are skipped, an interrupted one resumes. DATA overrides the
# data path; SEEDS (default "0 1 2") the seeds; CONTROL=0 leaves the control out.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/study_common.sh "$@"  # PYTHON, and STUDY: the study, or with --plan a check of it
OUT=results/effnet-study
RECIPE=(--schedule cosine --warmup-epochs 1 --lr 0.03 --nesterov --momentum 0.9 --weight-decay 5e-5
        --batch-size 64 --label-smoothing 0.1 --crop-padding 2 --test-time-flip)
read -r -a SEED_LIST <<< "${SEEDS:-0 1 2}"
COMMON=(--models efficientnet_b0 --epochs 4 --subset 10000 --device cpu --layer-stats-every 40
        --data "$DATA" --out "$OUT" --no-report)
VARIANTS=(
    "--modes baseline"
    "--modes amp"
    "--modes manual"
    "--modes manual --loss-scale none"
    "--modes manual --loss-scale 1024"
)
# Seeds vary slowest, so an interrupted study leaves whole seeds.
for seed in "${SEED_LIST[@]}"; do
    for variant in "${VARIANTS[@]}"; do
        # shellcheck disable=SC2086  # a variant is several words on purpose
        "${STUDY[@]}" $variant --seeds "$seed" "${RECIPE[@]}" "${COMMON[@]}"
    done
done
CONTROL_OUT=results/effnet-study-resnet20
if [[ "${CONTROL:-1}" == 1 ]]; then
    for variant in "--modes manual" "--modes manual --loss-scale none"; do
        # shellcheck disable=SC2086  # a variant is several words on purpose
        "${STUDY[@]}" $variant --seeds 0 "${RESNET20_RECIPE[@]}" --models resnet20 --epochs 8 --subset 10000 \
            --device cpu --layer-stats-every 40 --data "$DATA" \
            --out "$CONTROL_OUT" --no-report
    done
fi
if [[ "${1:-}" != --plan ]]; then
    "$PYTHON" -m mixprec.report "$OUT"
    if [[ "${CONTROL:-1}" == 1 ]]; then
        "$PYTHON" -m mixprec.report "$CONTROL_OUT"
    fi
fi
