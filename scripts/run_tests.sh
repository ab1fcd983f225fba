#!/usr/bin/env bash
# Run the test suite inside .venv (scripts/setup_env.sh must have run).  Extra args go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
# pytest.ini sets testpaths = tests; paths given here narrow the run
exec .venv/bin/python -m pytest -ra --durations=40 "$@"
