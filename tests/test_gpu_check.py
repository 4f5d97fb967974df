"""experiments/gpu_check.sh cannot run here; what can be checked is that it fails loudly without a GPU, and that
its per-layer agreement table is computed right (on a CPU, against PyTorch's CPU FP16 kernels)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from half_agreement import LAYERS, main as half_agreement  # noqa: E402


def _gpu_check(out, python: str):
    return subprocess.run(["bash", str(ROOT / "experiments" / "gpu_check.sh"), str(out)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": python})


@pytest.mark.parametrize("python, expect", [(sys.executable, "NVIDIA GPU"), (None, "has no torch")])
def test_gpu_check_without_a_gpu_or_torch_stops_at_once_with_one_line_and_writes_nothing(python, expect, tmp_path):
    out = tmp_path / "gpu-check"
    if python is None:  # an interpreter without torch: a venv made here without site packages
        venv = tmp_path / "bare"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        python = str(venv / "bin" / "python3")
    proc = _gpu_check(out, python)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.sh: ") and expect in lines[0], proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_half_agreement_table_on_a_cpu(capsys):
    assert half_agreement(["--device", "cpu", "--max-u", "8"]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == list(LAYERS)
    assert half_agreement(["--device", "cpu", "--max-u", "0"]) == 1  # the emulation is not bit-exact to the kernels
