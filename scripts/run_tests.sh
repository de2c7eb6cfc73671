#!/usr/bin/env bash
# The whole test suite: bootstrap, GoogleTest (ctest), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
.venv/bin/ctest --test-dir build/cmake --output-on-failure
.venv/bin/python -m pytest -q -ra "$@"
