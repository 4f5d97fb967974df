# Sourced by the study scripts, from the repository root, with the script's arguments: sets PYTHON (default
# python3: a plain `python` may be absent, or not the one with torch) and STUDY, the command each variant runs:
# `python -m mixprec.study`, or with --plan a check that validates every mixprec.run command line and prints it.
PYTHON="${PYTHON:-python3}"
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
