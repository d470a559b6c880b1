#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite, slow end-to-end tests included (as CI does).
# For a quick loop while developing: .venv/bin/pytest   (skips tests marked slow)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-browser.sh  # Debian's chromium for the web UI's browser test
.venv/bin/ruff check src tests $([ -d bench ] && echo bench)
exec .venv/bin/python -m pytest -m "slow or not slow" -q "$@"
