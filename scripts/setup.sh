#!/usr/bin/env bash
# Create .venv and install transferlab with pinned dependencies. Idempotent: a second run
# only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# (the grep hides this machine's noisy local-index warnings; pipefail keeps pip's exit status)
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -e . 2>&1 \
  | { grep -v "^WARNING: Location" || true; }
# The bundled offline weights go on the weights search path (an absolute path in the user's
# config), so the default backbone resolves from any working directory.
if [ -d ../shared/weights ]; then
  .venv/bin/transferlab backbones --add-weights-dir ../shared/weights --offline --limit 0 >/dev/null
fi
.venv/bin/python -c "import transferlab, torch, timm; print('transferlab', transferlab.__version__, '| torch', torch.__version__, '| timm', timm.__version__)"
