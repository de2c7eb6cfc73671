#!/usr/bin/env bash
# The CUDA check, for a machine with a GPU, torch and nvcc and nothing else of ours (the lent H200):
#   deps      python, torch, the GPU, nvcc, compute-sanitizer and the Python packages the parts use;
#             a missing package is installed where that works (from .gpu_carry/wheels, written by
#             scripts/pack_for_gpu.sh, or the registry), and reported either way
#   build     the extension in place with CUDA (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=nproc)
#   tests     every test marked `cuda` (pytest -m cuda), on past failures, JUnit XML
#   memcheck  compute-sanitizer --tool memcheck over a few op tests
#   bench     the ops table and optimize_layer per layer at ImageNet sizes (graphs off and on)
#   job       the main job's W4A8 run (trains its FP32 model on the GPU first when none is carried)
# Everything lands in $OUT (default ./gpu_out): check.log, summary.txt, junit-*.xml, bench-*.txt.
# Parts run in that order, each within its cap and what is left of CHECK_SECONDS (default 480, so
# that a second, shorter call still fits the device time); a part that finds too little time left is
# skipped with a line saying so.
#
#   bash scripts/check_cuda.sh                     # device tool: timeout_s=570, carry=[".gpu_carry"] if packed
#   PARTS="tests memcheck" bash scripts/check_cuda.sh
#   bash scripts/check_cuda.sh --dry-run           # here: deps, build (CUDA compile included), and the
#                                                  # commands and tests each part would run
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${OUT:-gpu_out}
PARTS=${PARTS:-build tests memcheck bench job}
DEADLINE=${CHECK_SECONDS:-480}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python:$PWD/tests
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} FORCE_CUDA=1
[ -d .gpu_carry/fashion-mnist ] && export FASHION_MNIST_DIR=$PWD/.gpu_carry/fashion-mnist
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# ---- deps -------------------------------------------------------------------------------------
echo "== deps"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /' |
  tee -a "$SUMMARY" || note "gpu: nvidia-smi not found"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
                                   '| cuda', torch.version.cuda, '| device', torch.cuda.is_available())" |
  tee -a "$SUMMARY"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
[ -x "$NVCC" ] && note "nvcc: $("$NVCC" --version | tail -1)" || note "nvcc: MISSING (the build part fails)"
SANITIZER=$(command -v compute-sanitizer || echo "$(dirname "$NVCC")/compute-sanitizer")
[ -x "$SANITIZER" ] && note "compute-sanitizer: $SANITIZER" || { note "compute-sanitizer: MISSING"; SANITIZER=""; }
have() { "$PY" -c "import $1" 2>/dev/null; }
install() {  # install PACKAGE: from carried wheels, else the registry, briefly; either may be absent
  local pip=("$PY" -m pip install -q --disable-pip-version-check)
  if [ -d .gpu_carry/wheels ]; then
    "${pip[@]}" --no-index --find-links .gpu_carry/wheels "$1" 2>/dev/null ||
      "${pip[@]}" --break-system-packages --no-index --find-links .gpu_carry/wheels "$1" 2>/dev/null && return 0
  fi
  timeout 60 "${pip[@]}" --timeout 5 --retries 0 "$1" 2>/dev/null ||
    timeout 60 "${pip[@]}" --break-system-packages --timeout 5 --retries 0 "$1" 2>/dev/null
}
for pkg in pytest numpy torchvision ninja; do
  if have "$pkg"; then
    note "$pkg: $("$PY" -c "import $pkg; print(getattr($pkg, '__version__', 'present'))")"
  elif ((DRY_RUN)); then
    note "$pkg: MISSING (would try to install it)"
  elif install "$pkg" && have "$pkg"; then
    note "$pkg: installed now"
  else
    note "$pkg: MISSING, could not install"
  fi
done
export PATH="$("$PY" -c 'import sys, os; print(os.path.dirname(sys.executable))'):$PATH"  # ninja's script

# ---- parts ------------------------------------------------------------------------------------
# run_part NAME CAP_SECONDS MIN_SECONDS COMMAND...: COMMAND under `timeout min(CAP, time left)`, or a
# line saying why it was skipped; with --dry-run, the command it would run.
run_part() {
  local name=$1 cap=$2 least=$3
  shift 3
  [[ " $PARTS " == *" ${name%%:*} "* ]] || return 0
  if ((DRY_RUN)) && [ "$name" != build ]; then
    echo "== would run $name (up to ${cap}s): $*"
    return 0
  fi
  local left=$((DEADLINE - SECONDS))
  if ((left < least)); then
    note "$name: SKIPPED, ${left}s left of ${DEADLINE}s, needs ${least}s (rerun with PARTS=\"${name%%:*}\")"
    return 0
  fi
  ((cap > left)) && cap=$left
  echo "== $name (up to ${cap}s, at ${SECONDS}s)"
  local start=$SECONDS
  timeout "$cap" "$@"
  local rc=$?
  note "$name: exit $rc in $((SECONDS - start))s$( ((rc == 124)) && echo " (time cap)")"
}

# A build from scratch takes ~4 minutes on 2 cores (a dry run here), ~1 on 16.
run_part build "$( ((DRY_RUN)) && echo 1500 || echo 240)" 60 "$PY" setup.py -q build_ext --inplace
"$PY" -c "import adaround_ext as ae; assert ae.CUDA_COMPILED, 'built without CUDA'" 2>/dev/null ||
  note "build: the extension does not import with CUDA kernels"

if ((DRY_RUN)); then
  count=$("$PY" -m pytest -q --collect-only -m cuda -p no:cacheprovider 2>/dev/null | tail -1)
  note "tests: pytest -m cuda selects: $count"
fi
run_part tests 240 60 "$PY" -m pytest -q -rfE -m cuda -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUT/junit-cuda.xml"
# memcheck: the ops' CUDA kernels under the sanitizer (slow: a few small cases).
MEMCHECK_TESTS=(tests/test_cuda_device.py tests/test_activation_quant.py tests/test_channel_clip.py
  -k "step_ops or (rounding_ops and asymmetric and float32) or (cuda_kernels_equal_the_cpu_kernels and not emulated)")
if ((DRY_RUN)); then
  note "memcheck: selects $("$PY" -m pytest -q --collect-only -p no:cacheprovider "${MEMCHECK_TESTS[@]}" 2>/dev/null | tail -1)"
fi
[ -n "$SANITIZER" ] || ((DRY_RUN)) && run_part memcheck 90 30 "${SANITIZER:-compute-sanitizer}" --tool memcheck \
  --error-exitcode 3 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/junit-memcheck.xml" "${MEMCHECK_TESTS[@]}"
run_part bench:ops 60 20 bash -c "cd benchmarks && '$PY' bench_ops.py --device cuda | tee '$OUT/bench-ops.txt'"
run_part bench:imagenet 150 60 bash -c "cd benchmarks && '$PY' bench_optimize_layer.py --device cuda --imagenet \
  --iterations 300 | tee '$OUT/bench-imagenet.txt'"
run_part job 240 90 "$PY" examples/quantize_resnet.py --settings w4a8 --iterations 10000 --seeds 0 --no-progress

# ---- summary ----------------------------------------------------------------------------------
for xml in "$OUT"/junit-*.xml; do
  [ -f "$xml" ] || continue
  "$PY" - "$xml" <<'PYSUMMARY' | tee -a "$SUMMARY"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
count = lambda key: sum(int(s.get(key, 0)) for s in suites)
name = sys.argv[1].rsplit("/", 1)[-1]
print(f"{name}: {count('tests')} tests, {count('failures')} failed, {count('errors')} errors, {count('skipped')} skipped")
for case in root.iter("testcase"):
    for bad in list(case.findall("failure")) + list(case.findall("error")):
        print(f"  FAILED {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '').splitlines()[0][:160]}")
PYSUMMARY
done
echo "== summary ($OUT/summary.txt)"
cat "$SUMMARY"
