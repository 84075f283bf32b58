#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, the long tests included.
#
#   bash scripts/test.sh            # extra arguments go to pytest, e.g. -m "not slow" or -k merge
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# The web demo's browser test drives Debian's Chromium (Playwright's own browser download cannot run here).
if ! command -v chromium >/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then
        echo "test: installing chromium for the browser test" >&2
        apt-get update -qq && apt-get install -y -qq chromium fonts-wqy-zenhei >/dev/null
    else
        echo "test: the browser test needs chromium: sudo apt-get install chromium fonts-wqy-zenhei" >&2
    fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/shellcheck finetune/*.sh scripts/*.sh .ci/run
exec .venv/bin/python -m pytest "$@"
