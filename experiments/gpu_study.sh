#!/usr/bin/env bash
# The GPU study as one command (experiments/gpu_study.py says what it runs, in what order, under what budget).
#
#   bash experiments/gpu_study.sh OUT --data PATH [--budget-s 480] [--results results/gpu-study]
#   bash experiments/gpu_study.sh OUT --data PATH --rehearse      # the same pipeline on the CPU, tiny sizes
#
# Writes OUT/gpu-study.tar.gz, whatever happens. Runs with ${PYTHON:-python3} from this source tree, installs
# nothing. docs/gpu.md says how to run it on a GPU machine and what to do with the archive.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_study.py" "$@"
