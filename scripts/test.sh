#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, the long tests included.
#
#   bash scripts/test.sh            # extra arguments go to pytest, e.g. -m "not slow" or -k merge
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/shellcheck finetune/*.sh scripts/*.sh .ci/run
exec .venv/bin/python -m pytest "$@"
