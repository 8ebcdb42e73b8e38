"""Ray Train stage: DDP on 2 CPU workers, checkpoints, resume, and `ray job submit`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from raycap.data.synthetic import generate
from raycap.features import ExtractConfig, extract_features
from raycap.models.checkpoint import load_checkpoint, load_optimizer_state
from raycap.models.decoders import DecoderConfig
from raycap.models.encoder import EncoderConfig
from raycap.recipe import TrainConfig
from raycap.train import TrainJobConfig, train

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
ENCODER = EncoderConfig("resnet18", "none", grid=3, image_size=64)


@pytest.fixture(scope="module")
def tiny_features(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("train_data")
    data = generate(root / "coco", n_train=32, n_val=8, seed=3)
    out = str(root / "features")
    extract_features(ExtractConfig(out=out, coco_root=str(data.root), encoder=ENCODER, min_freq=1))
    return out


def _job(features: str, storage: Path, name: str, epochs: int, kind: str = "attention") -> TrainJobConfig:
    return TrainJobConfig(
        features=features,
        decoder=DecoderConfig(kind, embed_dim=32, decoder_dim=32, attention_dim=32, dropout=0.0),
        train=TrainConfig(epochs=epochs, batch_size=4, lr=3e-3, beam_size=2, max_decode_len=16),
        num_workers=2,
        cpus_per_worker=1.0,
        storage_path=str(storage),
        run_name=name,
        keep_checkpoints=10,
    )


def _epochs(run_dir: str) -> dict[int, Path]:
    """Checkpoint directory of each reported epoch of a run."""
    found = {}
    for meta in Path(run_dir).glob("checkpoint_*/meta.json"):
        found[json.loads(meta.read_text())["epoch"]] = meta.parent
    return found


def _adam_steps(checkpoint: Path) -> int:
    state = load_optimizer_state(checkpoint)
    return int(next(iter(state["state"].values()))["step"])


def test_ddp_training_reports_metrics_and_checkpoints_and_loss_falls(tiny_features: str, tmp_path: Path) -> None:
    outcome = train(_job(tiny_features, tmp_path, "ddp", epochs=3))
    epochs = _epochs(outcome.run_dir)
    assert sorted(epochs) == [0, 1, 2]
    losses = [load_checkpoint(epochs[e]).metrics["train_loss"] for e in range(3)]
    assert losses[2] < losses[0]
    for key in ("bleu1", "bleu4", "cider_d", "val_ce"):
        assert key in outcome.last_metrics
    best = load_checkpoint(outcome.best_checkpoint)
    assert best.metrics["bleu4"] == max(load_checkpoint(p).metrics["bleu4"] for p in epochs.values())
    predictions = json.loads((Path(outcome.best_checkpoint) / "predictions.json").read_text())
    assert len(predictions) == 8 and {"image_id", "caption"} <= set(predictions[0])


def test_rerun_with_same_name_resumes_at_next_epoch_with_optimizer_state(tiny_features: str, tmp_path: Path) -> None:
    first = train(_job(tiny_features, tmp_path, "resume", epochs=2))
    after_two = _epochs(first.run_dir)
    steps_two = _adam_steps(after_two[1])
    resumed = train(_job(tiny_features, tmp_path, "resume", epochs=3))
    epochs = _epochs(resumed.run_dir)
    assert sorted(epochs) == [0, 1, 2]
    assert json.loads((epochs[2] / "meta.json").read_text())["epoch"] == 2
    # Adam's step count carried over: epoch 2 added half again the steps of epochs 0-1.
    assert _adam_steps(epochs[2]) == steps_two * 3 // 2
    final = load_checkpoint(epochs[2]).decoder.state_dict()
    previous = load_checkpoint(after_two[1]).decoder.state_dict()
    assert any(not torch.equal(final[k], previous[k]) for k in final)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dashboard(address: str, cluster: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if cluster.poll() is not None:
            raise RuntimeError(f"ray start exited with {cluster.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {address} not up after {timeout_s}s:\n{log.read_text()[-3000:]}")


def test_ray_job_submit_runs_train_script_to_success(tiny_features: str, tmp_path: Path) -> None:
    ray_cli = str(Path(sys.executable).parent / "ray")
    dashboard = _free_port()
    address = f"http://127.0.0.1:{dashboard}"
    env = {**os.environ, "RAY_ADDRESS": ""}
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = [
        ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=4",
        "--object-store-memory=500000000", f"--temp-dir={temp_dir}",
    ]
    log = tmp_path / "ray_head.log"
    # --block keeps the head in the foreground: stopping its process group stops this cluster only,
    # where `ray stop` would also stop the test session's own Ray.
    with log.open("w") as out:
        cluster = subprocess.Popen(head, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_dashboard(address, cluster, log)
        submit = [
            ray_cli, "job", "submit", f"--address={address}", "--",
            sys.executable, str(REPO / "jobs" / "train.py"), "--features", tiny_features, "--model", "gru",
            "--epochs", "1", "--batch-size", "4", "--embed-dim", "16", "--decoder-dim", "16",
            "--storage-path", str(tmp_path / "runs"), "--run-name", "submitted",
        ]
        deadline = time.time() + 120
        while True:  # the job agent comes up some seconds after the dashboard
            done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
            if done.returncode == 0 or "No available agent" not in done.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in (done.stdout + done.stderr).lower(), done.stdout[-2000:]
        assert _epochs(str(tmp_path / "runs" / "submitted"))
    finally:
        os.killpg(cluster.pid, signal.SIGTERM)
        try:
            cluster.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # what ignored SIGTERM
            os.killpg(cluster.pid, signal.SIGKILL)
        cluster.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
