"""bench/gpu.sh, the prepared GPU check, run as CI can: without a GPU, the same code at tiny sizes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 2 minutes (`make test-slow`): it keeps `make test` under 20 minutes
def test_gpu_check_runs_every_phase_at_tiny_sizes_without_a_gpu(tmp_path: Path) -> None:
    # Its own local Ray, as a user runs it; no GPU visible even where the test machine has one.
    env = {**os.environ, "RAY_ADDRESS": "", "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    figures = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert figures["device"] == "cpu" and figures["goals_apply"] is False
    assert figures["sizes"]["images"] == 24  # every image extracted: gpu.py checks the published rows
    for key in ("extract_images_per_s_per_gpu", "train_captions_per_s", "coco_epoch_s", "serve_rps_c32"):
        assert figures[key] > 0, key
    assert 0 <= figures["ratio"] < 1  # the GPU goals, far out of a CPU's reach at tiny sizes
    for phase in ("extraction", "training", "serving"):
        assert any(line.startswith(f"{phase} (") for line in done.stdout.splitlines()), phase
    assert json.dumps(figures) in (tmp_path / "gpu_check.txt").read_text()  # the copy kept under $OUT
