#!/usr/bin/env bash
# Creates benchmarks/peers/.venv-aimet with Qualcomm's aimet-torch, kept apart from the project's
# .venv (aimet pulls its own dependency set). The same torch/torchvision pair as the project is
# pinned so both tools run on the same framework build. Prints the pip error and exits non-zero
# when the install fails; compare_aimet.py then reports that error instead of AIMET's figures.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv-aimet
AIMET_VERSION=${AIMET_VERSION:-2.42.0}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if ! "$VENV/bin/python" -c "import aimet_torch" 2>/dev/null; then
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "aimet-torch==$AIMET_VERSION" torch==2.14.1 torchvision==0.29.2 2>&1 \
    | tee install.log
fi
"$VENV/bin/python" -c "import aimet_torch, torch; print('aimet-torch', aimet_torch.__version__ if hasattr(aimet_torch, '__version__') else '?', 'torch', torch.__version__)"
