# Sourced by the study scripts, from the repository root, with the script's arguments: sets PYTHON (default
# python3: a plain `python` may be absent, or not the one with torch), DATA (default the shared CIFAR-10), and
# STUDY, the command each variant runs: `python -m mixprec.study`, or with --plan a check that validates every
# mixprec.run command line and prints it; and RESNET20_RECIPE, recipe v3 (results/README.md), which the cifar10
# study (for both its models), the ablation study and the efficientnet study's resnet20 control share.
PYTHON="${PYTHON:-python3}"
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"  # the data, for every study
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
RESNET20_RECIPE=(--schedule cosine --warmup-epochs 1 --lr 0.2 --nesterov --momentum 0.9 --weight-decay 5e-4
                 --batch-size 64 --label-smoothing 0.1 --crop-padding 2 --test-time-flip)
