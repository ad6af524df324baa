#!/usr/bin/env bash
# The test suite: what CI runs and what the README's test command runs. Extra arguments go to
# pytest (e.g. -k resume, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q "$@" tests/
