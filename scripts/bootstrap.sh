#!/usr/bin/env bash
# Idempotent setup of a fresh machine: Debian packages, the virtual environment (.venv) with the
# pinned Python packages, the extension (in place) and the CMake/GoogleTest build (build/cmake).
# A second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/.venv/bin:/usr/local/cuda/bin:$PATH"  # ninja and cmake from the venv; nvcc

# --- Debian packages -----------------------------------------------------------------------
missing=()
for pkg in g++ libgtest-dev dataset-fashion-mnist; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- virtual environment -------------------------------------------------------------------
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python - <<'PYCHECK' 2>/dev/null; then
import importlib.metadata as md, re, sys
for line in open("requirements.txt"):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name = re.split(r"[<>=!]", line)[0]
    md.version(name)  # raises if missing
    pin = re.search(r"==([\w.]+)", line)
    if pin and not md.version(name).startswith(pin.group(1)):
        sys.exit(1)
PYCHECK
  echo "bootstrap: installing Python packages (torch is a few GB the first time)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
fi

# --- the extension -------------------------------------------------------------------------
# Built in place (build/temp.*, incremental), then registered as an editable install without a second
# build: pip's own build would use a throw-away directory and the next in-place build would redo it all.
.venv/bin/python setup.py -q build_ext --inplace
# Registered again when the console script no longer names the entry point setup.py declares.
if ! .venv/bin/pip show -q adaround_ext >/dev/null 2>&1 ||
   ! grep -q "from adaround_testbed.cli import main" .venv/bin/adaround-quantize-resnet 2>/dev/null; then
  echo "bootstrap: registering adaround_ext (pip install -e)"
  ADAROUND_REGISTER_ONLY=1 .venv/bin/pip install -q --no-build-isolation --no-deps -e .
fi

# --- CMake library and GoogleTest suite ----------------------------------------------------
if [ "${SKIP_CMAKE:-0}" != "1" ]; then
  [ -f build/cmake/build.ninja ] || .venv/bin/cmake -S . -B build/cmake -G Ninja \
      -DPython3_EXECUTABLE="$ROOT/.venv/bin/python" >/dev/null
  .venv/bin/cmake --build build/cmake -j"$(nproc)"
fi
echo "bootstrap: ready"
