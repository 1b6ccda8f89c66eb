#!/usr/bin/env bash
# The check of a borrowed GPU machine (bench/gpu_check.py says what it runs): bash bench/gpu_check.sh [--cpu-smoke]
# from any folder, with the machine's Python (PYTHON, else python, else python3); results in $OUT.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
exec "${PYTHON:-$(command -v python || command -v python3)}" -m bench.gpu_check "$@"
