"""scripts/check_cuda.sh --dry-run: the GPU check builds here (CUDA compile included where nvcc is)
and lists what it would run, so that its one call on a lent GPU machine does not fail on a typo."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.slow  # over 10 s on 2 cores
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="the check builds with CUDA: needs nvcc")
def test_dry_run_builds_and_lists_every_part(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable,
               PATH="/usr/local/cuda/bin:" + os.environ.get("PATH", ""))
    result = subprocess.run(["bash", "scripts/check_cuda.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1800)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "build: exit 0" in out
    selected = re.search(r"tests: pytest -m cuda selects: (\d+)/", out)
    assert selected and int(selected.group(1)) >= 150, out[-3000:]
    memcheck = re.search(r"memcheck: selects (\d+)/", out)
    assert memcheck and 2 <= int(memcheck.group(1)) <= 8
    for part in ("tests", "memcheck", "bench:ops", "bench:imagenet", "job"):
        assert f"== would run {part} " in out
    tests_line = next(line for line in out.splitlines() if line.startswith("== would run tests "))
    assert "-m cuda" in tests_line and "--junitxml=" in tests_line and " -x" not in tests_line
    assert "--tool memcheck" in out
    for name in ("pytest", "numpy", "torchvision", "ninja", "nvcc"):
        assert re.search(rf"^{name}: ", out, re.M), name
    assert (tmp_path / "summary.txt").read_text().startswith(("gpu:", "python"))
    assert (tmp_path / "check.log").exists()
