#!/usr/bin/env bash
# The real CIFAR-10 study (issue 16): resnet20 in baseline (FP32), amp (float16 autocast + GradScaler, emulated
# tensor-core arithmetic on a CPU) and manual mode, on all 45,000 training images, 10 epochs, model selection on
# the 5,000-image validation split, evaluated on the full 10,000-image test set; and a small second model,
# efficientnet_b0, seed 0, on a stratified 10,000-image subset for 5 epochs (its rows are marked subset=10000).
#
#   bash experiments/study_cifar10.sh [resnet20|efficientnet_b0|all] [SEED ...]     (default: all, seeds 0 1 2)
#
# The recipe (results/README.md says which --subset probes chose it): linear warm-up over the first epoch from
# lr/10 to a peak of 0.2, then cosine annealing to 0; SGD with Nesterov momentum 0.9, weight decay 5e-4,
# batch 64 (faster per image on a CPU than 128), label smoothing 0.1, random crops from a 2-pixel padding
# (not 4: the run underfits); evaluation averages each image's logits with its mirror image's (--test-time-flip). About 20 minutes per
# resnet20 run on 2 CPU cores, 3-4 hours in all.
# Seeds vary slowest, so one seed's three modes run in a row; run it again after an interruption: completed
# runs are skipped and an interrupted one is resumed. DATA overrides the data path.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/study_common.sh  # PYTHON, DATA and RESNET20_RECIPE (recipe v3, for both models here)
PART="${1:-all}"
shift || true
SEEDS=("$@")
[[ ${#SEEDS[@]} -gt 0 ]] || SEEDS=(0 1 2)
case "$PART" in
    resnet20|efficientnet_b0|all) ;;
    *) echo "study_cifar10.sh: unknown part '$PART': use resnet20, efficientnet_b0 or all" >&2; exit 2 ;;
esac
COMMON=(--modes baseline amp manual --device cpu --data "$DATA"
        --out results/cifar10-study)
if [[ "$PART" != efficientnet_b0 ]]; then
    "$PYTHON" -m mixprec.study --models resnet20 --seeds "${SEEDS[@]}" --epochs 10 "${RESNET20_RECIPE[@]}" \
        "${COMMON[@]}"
fi
if [[ "$PART" != resnet20 ]]; then
    "$PYTHON" -m mixprec.study --models efficientnet_b0 --seeds 0 --epochs 5 --subset 10000 "${RESNET20_RECIPE[@]}" \
        "${COMMON[@]}"
fi
