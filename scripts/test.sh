#!/usr/bin/env bash
# The test suite, in two pytest processes (a-i, j-z). One process running all ~400 tests died
# with SIGSEGV at the same point every time (after ~340 tests, during test_resume); each half
# passes on its own. Until that native crash is understood, the halves keep CI honest rather
# than hiding a test. Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q "$@" tests/test_[a-i]*.py
.venv/bin/python -m pytest -q "$@" tests/test_[j-z]*.py
