"""jobs/serve.py as a user runs it, joined to the session's Ray (--address) and called over real HTTP
on 127.0.0.1: given a training run's folder it serves the run's best checkpoint and says which; it
stops in one line, exit 0, on Ctrl-C (deleting its application) and when Serve is shut down from
elsewhere (`serve shutdown -y`). A checkpoint that passes the job's checks but fails to load in a
replica ends the deploy in one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import requests
from helpers import REPO, deploy_pinned, free_port, image, make_checkpoint
from ray import serve

from raycap.serve_schema import APP_NAME

pytestmark = pytest.mark.integration
SERVING_S = 300  # Serve's controller, proxy and three deployments start on a busy 2-core machine
STOP_S = 120
CHECKPOINT = "checkpoint_2026-01-01_00-00-00.000000"


class Job:
    """jobs/serve.py in a subprocess, its output (stdout and stderr) collected line by line."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        address = ray.get_runtime_context().gcs_address
        argv = [sys.executable, "jobs/serve.py", *args, "--address", address, "--port", str(free_port())]
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def serving(self) -> str:
        """The job's base URL, once it says it serves."""
        deadline = time.monotonic() + SERVING_S
        while time.monotonic() < deadline:
            found = [line for line in self.lines if line.startswith("[raycap] serving ")]
            if found:
                return found[0].split(" at ", 1)[1].split("/caption", 1)[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.proc.kill()
        pytest.fail("jobs/serve.py never served:\n" + "\n".join(self.lines[-40:]))

    def wait(self) -> tuple[int, list[str]]:
        """Its exit status and its output from the serving line on."""
        code = self.proc.wait(timeout=STOP_S)
        time.sleep(0.2)  # the reader takes the last lines
        start = next(i for i, line in enumerate(self.lines) if line.startswith("[raycap] serving "))
        return code, self.lines[start:]


@pytest.fixture
def no_serve_left(ray_session: None) -> Iterator[None]:
    try:
        yield
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training run's folder holding one checkpoint."""
    root = tmp_path_factory.mktemp("serve_job")
    run = root / "runs" / "attention"
    run.mkdir(parents=True)
    shutil.copytree(make_checkpoint(root, "ck", grid=4, seed=0), run / CHECKPOINT)
    return run


def test_serves_a_runs_best_checkpoint_and_stops_on_ctrl_c_in_one_line(run: Path, no_serve_left: None) -> None:
    job = Job("--checkpoint", str(run))
    url = job.serving()
    assert f"[raycap] using the best checkpoint of run {run}: {run / CHECKPOINT}" in "\n".join(job.lines)
    response = requests.post(f"{url}/caption", data=image(1), timeout=60)
    assert response.status_code == 200 and response.json()["model"] == CHECKPOINT, response.text
    job.proc.send_signal(signal.SIGINT)
    code, output = job.wait()
    assert code == 0, output
    assert output[-1] == f"[raycap] stopped: application {APP_NAME!r} deleted", output
    assert not any(word in line for line in output for word in ("Traceback", "error", "graceful_shutdown")), output
    assert APP_NAME not in serve.status().applications


def test_exits_when_serve_is_shut_down_elsewhere(run: Path, no_serve_left: None) -> None:
    job = Job("--checkpoint", str(run / CHECKPOINT))
    job.serving()
    serve.shutdown()  # another driver, as `serve shutdown -y` does through the dashboard
    code, output = job.wait()
    assert code == 0, output
    assert output[-1] == f"[raycap] stopped: application {APP_NAME!r} shut down from elsewhere", output
    assert not any("Traceback" in line for line in output), output


def test_a_checkpoint_that_fails_in_a_replica_ends_the_deploy_in_one_line(
    run: Path, tmp_path: Path, no_serve_left: None
) -> None:
    broken = shutil.copytree(run / CHECKPOINT, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\0" * 100)  # meta.json reads: only loading it fails
    with pytest.raises(ValueError) as failed:
        deploy_pinned(str(broken), max_decode_len=8)
    message = str(failed.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith(f"application {APP_NAME!r} failed to deploy: Decoder: "), message
    assert f"{broken}/model.safetensors is not a readable safetensors file" in message, message
