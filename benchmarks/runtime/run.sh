#!/usr/bin/env bash
# Runtime benchmarks (see run.py): run from anywhere, on a quiet machine, for the committed numbers.
#   bash benchmarks/runtime/run.sh            # full setting (~30-60 min on 2 CPU cores)
#   bash benchmarks/runtime/run.sh --quick    # smoke run of every part (a few minutes)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
export TOKENIZERS_PARALLELISM=false
exec python benchmarks/runtime/run.py "$@"
