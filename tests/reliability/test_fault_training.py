"""Training under faults: a worker killed mid-run, damaged or planted checkpoints, secrets kept out of logs.

The runs are tiny (32 synthetic images, 32-wide decoder, epochs well under a second) so the
figures printed with -s (epoch killed, epochs redone, final metrics) cost little to reproduce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import ray
import torch
from helpers import cmdline, descendants
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raycap import storage
from raycap.data.vocab import Vocab
from raycap.models.checkpoint import (
    STATE_FILE,
    CaptionModel,
    CheckpointError,
    TrainState,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from raycap.models.decoders import DecoderConfig, build_decoder
from raycap.models.encoder_config import EncoderConfig
from raycap.recipe import TrainConfig
from raycap.train import (
    SCALARS,
    TENSORBOARD_DIR,
    TrainJobConfig,
    TrainOutcome,
    best_loadable,
    restore,
    train,
    train_models,
)

if TYPE_CHECKING:
    from conftest import S3Server

ENCODER = EncoderConfig("resnet18", "none", grid=3, image_size=64)
EPOCHS = 6


def _job(features: str, storage_path: str, name: str, epochs: int = EPOCHS) -> TrainJobConfig:
    return TrainJobConfig(
        features=features,
        decoder=DecoderConfig("attention", embed_dim=32, decoder_dim=32, attention_dim=32, dropout=0.0),
        train=TrainConfig(epochs=epochs, captions_per_step=40, lr=3e-3, lr_rule="none", beam_size=2, max_decode_len=12),
        num_workers=2,
        cpus_per_worker=0.5,
        storage_path=storage_path,
        run_name=name,
        keep_checkpoints=3 * EPOCHS,  # keep every checkpoint, redone ones too: the tests count them
    )


def _checkpoints(run_dir: str | Path) -> list[tuple[Path, int]]:
    """(checkpoint dir, epoch) of every readable checkpoint of a local run, oldest first (Ray names them by time)."""
    found = []
    for meta in sorted(Path(run_dir).glob("checkpoint_*/meta.json")):
        with contextlib.suppress(ValueError):  # one being written right now
            found.append((meta.parent, json.loads(meta.read_text())["epoch"]))
    return found


def _adam_steps(checkpoint: Path) -> int:
    return int(next(iter(load_optimizer_state(checkpoint)["state"].values()))["step"])


def _registered_epoch(run_dir: Path) -> int | None:
    """Epoch of the latest checkpoint Ray Train has registered (its snapshot), None before the first."""
    with contextlib.suppress(OSError, ValueError):  # absent, or being rewritten
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
        return int(latest["metrics"]["epoch"]) if latest else None
    return None


def _train_until_registered(
    job: TrainJobConfig, run_dir: Path
) -> tuple[threading.Thread, dict[str, TrainOutcome | BaseException]]:
    """`train(job)` started in a thread, returned once its first checkpoint is registered (not merely
    written: a run resumes from registered ones only), it ends, or 300 s pass; with the dict its
    result or exception lands in, under "result"."""
    outcome: dict[str, TrainOutcome | BaseException] = {}

    def run() -> None:
        try:
            outcome["result"] = train(job)
        except BaseException as exc:  # reported by the caller's assertions
            outcome["result"] = exc

    runner = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    runner.start()
    while _registered_epoch(run_dir) is None and runner.is_alive() and time.monotonic() - started < 300:
        time.sleep(0.05)
    return runner, outcome


def _train_workers() -> set[int]:
    """Pids of this session's Ray Train workers: descendants of this process titled ray::RayTrainWorker."""
    return {pid for pid in descendants([os.getpid()]) if cmdline(pid).startswith(b"ray::RayTrainWorker")}


def _session_log_lines(*needles: str, timeout_s: float = 30) -> list[str]:
    """Lines of this Ray session's log files (workers, Ray Train) that contain every needle; waits for flushes."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path(), "logs")  # no public accessor
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [
            line
            for file in logs.rglob("*")
            if file.is_file()
            for line in file.read_text(errors="replace").splitlines()
            if all(needle in line for needle in needles)
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(1)


def _scalars(event_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(event_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def features(tiny_features: str) -> str:
    return tiny_features


@pytest.fixture(scope="module")
def baseline(features: str, tmp_path_factory: pytest.TempPathFactory) -> TrainOutcome:
    """An uninterrupted run: the reference for the faulted ones."""
    return train(_job(features, str(tmp_path_factory.mktemp("baseline")), "baseline"))


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def _assert_resumed_like_uninterrupted(
    reported: list[tuple[Path, int]], registered: int, last: dict[str, float], reference: dict[str, float]
) -> None:
    """After a fault once epoch `registered` was registered: every epoch's checkpoint once (at most the
    one in flight, written but not registered, redone), Adam's step count running on across the fault
    (the optimizer state was restored, not restarted), the last metrics within noise of `reference`."""
    counts = Counter(epoch for _, epoch in reported)
    steps0 = _adam_steps(reported[0][0])
    assert sorted(counts) == list(range(EPOCHS))
    assert all(counts[epoch] == 1 for epoch in range(registered + 1)) and sum(counts.values()) - len(counts) <= 1
    assert all(_adam_steps(path) == (epoch + 1) * steps0 for path, epoch in reported)
    assert last["epoch"] == EPOCHS - 1
    for key in ("train_loss", "val_ce"):  # BLEU/CIDEr on 8 images are too noisy to compare closely
        assert _close(last[key], reference[key], rel=0.15), (key, last[key], reference[key])
    assert abs(last["bleu1"] - reference["bleu1"]) <= 0.25


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_killed_worker_resumes_from_last_checkpoint_and_ends_like_uninterrupted_run(
    features: str, baseline: TrainOutcome, tmp_path: Path
) -> None:
    run_dir = tmp_path / "killed"
    runner, outcome = _train_until_registered(_job(features, str(tmp_path), "killed"), run_dir)
    workers = _train_workers()
    assert len(workers) == 2 and runner.is_alive(), f"no checkpoint registered while 2 workers ran: {outcome}"
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    while (killed_after := _registered_epoch(run_dir)) is None:  # the epoch a retry resumes after
        time.sleep(0.05)  # the snapshot was being rewritten
    while runner.is_alive() and not (_train_workers() - workers):  # the worker group is replaced
        time.sleep(0.1)
    replacements = _train_workers() - workers
    runner.join(timeout=300)
    result = outcome.get("result")
    assert isinstance(result, TrainOutcome), f"run did not finish after the kill: {result!r}"
    assert killed_after < EPOCHS - 1, "the run ended before the kill: nothing was tested"

    reported = _checkpoints(run_dir)
    counts = Counter(epoch for _, epoch in reported)
    redone = sum(counts.values()) - len(counts)
    last, reference = result.last_metrics, baseline.last_metrics
    shown = ("train_loss", "val_ce", "bleu1", "bleu4", "cider_d")
    print(
        f"\nkilled worker pid {victim} during epoch {killed_after + 1} (0-based; {killed_after} registered); "
        f"replacement workers {sorted(replacements)}; epochs reported {[e for _, e in reported]} ({redone} redone); "
        f"interrupted {', '.join(f'{k}={last[k]:.3f}' for k in shown)}; "
        f"uninterrupted {', '.join(f'{k}={reference[k]:.3f}' for k in shown)}"
    )
    assert replacements, "no new Ray Train workers after the kill"
    _assert_resumed_like_uninterrupted(reported, killed_after, last, reference)
    # TensorBoard shows each epoch once: the restart purged what it redid.
    steps = [step for step, _ in _scalars(run_dir / TENSORBOARD_DIR)["train/loss"]]
    assert steps == list(range(EPOCHS))


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_tensorboard_events_hold_every_scalar_each_epoch(baseline: TrainOutcome) -> None:
    scalars = _scalars(Path(baseline.run_dir) / TENSORBOARD_DIR)
    assert set(SCALARS.values()) <= set(scalars)
    for tag in SCALARS.values():
        assert [step for step, _ in scalars[tag]] == list(range(EPOCHS)), tag
    final = {key: scalars[tag][-1][1] for key, tag in SCALARS.items()}
    for key, value in final.items():
        assert value == pytest.approx(baseline.last_metrics[key], rel=1e-5, abs=1e-6), key
    assert scalars["train/loss"][-1][1] < scalars["train/loss"][0][1]


class Payload:
    """Unpickling this runs code that creates `marker`: a stand-in for a planted exploit."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",)


def _plant_pickle(target: Path, marker: Path) -> None:
    """Write at `target`, in torch.save's format, a pickle that creates `marker` when unpickled."""
    probe = marker.with_name(marker.name + ".probe")
    pickle.loads(pickle.dumps(Payload(probe)))  # the payload really runs when unpickled
    assert probe.exists()
    probe.unlink()
    torch.save(Payload(marker), target)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_resume_skips_damaged_checkpoints_for_the_newest_that_loads(
    features: str, baseline: TrainOutcome, tmp_path: Path
) -> None:
    run_dir = tmp_path / "runs" / "damaged"
    shutil.copytree(baseline.run_dir, run_dir)
    checkpoints = _checkpoints(run_dir)
    (planted, _), (garbled, _), (truncated, _), (good, good_epoch) = checkpoints[-1:-5:-1]
    steps0 = _adam_steps(checkpoints[0][0])
    marker = tmp_path / "unpickled.txt"
    _plant_pickle(planted / "optimizer.pt", marker)
    (garbled / "meta.json").write_text('{"format": "raycap-checkpoint-v1", "enc')
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])

    started = time.monotonic()
    outcome = train(dataclasses.replace(_job(features, str(tmp_path / "runs"), "damaged"), resume=True))
    seconds = time.monotonic() - started

    assert not marker.exists(), "the planted pickle ran"
    warned = {
        bad.name: _session_log_lines(f"skipping checkpoint {bad}", reason)
        for bad, reason in ((planted, "optimizer.pt"), (garbled, "JSONDecodeError"), (truncated, "model.safetensors"))
    }
    resumed = _session_log_lines(f"resuming from {good} (epoch {good_epoch}) instead")
    new = [(path, epoch) for path, epoch in _checkpoints(run_dir) if path not in {p for p, _ in checkpoints}]
    print(
        f"\nresume over 3 damaged checkpoints: fell back to epoch {good_epoch}, redid {[e for _, e in new]} "
        f"in {seconds:.0f} s; warnings: {[lines[0][-200:] for lines in warned.values() if lines]}"
    )
    assert all(warned.values()), warned
    assert resumed
    assert [epoch for _, epoch in new] == list(range(good_epoch + 1, EPOCHS))
    # Resumed with the good checkpoint's optimizer state: Adam's steps run on from it.
    assert _adam_steps(new[-1][0]) == EPOCHS * steps0
    assert outcome.best_checkpoint not in {str(planted), str(garbled), str(truncated)}
    load_checkpoint(outcome.best_checkpoint)


def _tiny_checkpoint(directory: Path, state: TrainState | None = None) -> Path:
    vocab = Vocab(["a", "cat"], max_words=4)
    decoder_cfg = DecoderConfig("gru", embed_dim=8, decoder_dim=8, dropout=0.0)
    decoder = build_decoder(decoder_cfg, len(vocab), ENCODER.feature_dim)
    optimizer = torch.optim.Adam(decoder.parameters())
    features = torch.zeros(1, ENCODER.grid**2, ENCODER.feature_dim)  # (B, P, C)
    decoder(features, torch.ones(1, 3, dtype=torch.long))[0].sum().backward()
    optimizer.step()
    return Path(save_checkpoint(directory, CaptionModel(decoder, vocab, ENCODER, decoder_cfg), optimizer, state))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("file", ["optimizer.pt", "model.safetensors"])
def test_checkpoint_files_holding_a_pickle_are_refused_without_running_it(tmp_path: Path, file: str) -> None:
    checkpoint = _tiny_checkpoint(tmp_path / "checkpoint")
    load_checkpoint(checkpoint)
    assert load_optimizer_state(checkpoint) is not None
    marker = tmp_path / "unpickled.txt"
    _plant_pickle(checkpoint / file, marker)
    load = {"optimizer.pt": load_optimizer_state, "model.safetensors": load_checkpoint}[file]
    with pytest.raises(CheckpointError, match=file):
        load(checkpoint)
    assert not marker.exists()


@pytest.mark.timeout(60)
def test_damaged_checkpoint_files_raise_checkpoint_error_naming_the_file(tmp_path: Path) -> None:
    damages = {
        "meta.json": b'{"format": ',
        "vocab.json": b"[]",
        "model.safetensors": b"\x00" * 10,
    }
    for name, content in damages.items():
        checkpoint = _tiny_checkpoint(tmp_path / name)
        (checkpoint / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_checkpoint(checkpoint)
    missing = _tiny_checkpoint(tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(missing)


def _run_of_checkpoints(run_dir: Path, epochs: int) -> list[ray.train.Checkpoint]:
    """A run folder as Ray Train lays it out: time-named checkpoints, each with the resume state."""
    checkpoints = []
    for epoch in range(epochs):
        state = TrainState(epoch, lr=1e-3, best_bleu4=0.1, since_best=0)
        directory = _tiny_checkpoint(run_dir / f"checkpoint_2026-01-01_00-00-{epoch:02d}.000000", state)
        checkpoints.append(ray.train.Checkpoint(str(directory)))
    return checkpoints


@pytest.mark.timeout(60)
def test_restore_falls_back_past_damaged_checkpoints_with_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    *older, latest, _ = _run_of_checkpoints(tmp_path / "run", 5)  # the last one: written after, never registered
    assert restore(latest).state.epoch == 3
    (Path(latest.path) / "model.safetensors").write_bytes(b"\x00" * 8)
    (Path(older[-1].path) / STATE_FILE).write_text("{")
    with caplog.at_level(logging.WARNING, logger="raycap.train"):
        restored = restore(latest)
    assert restored.state.epoch == 1
    expected = load_checkpoint(older[1].path).decoder.state_dict()
    assert all(torch.equal(restored.decoder[k], v) for k, v in expected.items())
    messages = [record.getMessage() for record in caplog.records]
    assert any(f"skipping checkpoint {latest.path}" in m and "model.safetensors" in m for m in messages), messages
    assert any(f"skipping checkpoint {older[-1].path}" in m and STATE_FILE in m for m in messages), messages
    assert any(f"resuming from {older[1].path} (epoch 1) instead" in m for m in messages), messages
    for checkpoint in older[:2]:
        (Path(checkpoint.path) / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=f"no checkpoint of the run at {tmp_path / 'run'} loads"):
        restore(latest)


@pytest.mark.timeout(60)
def test_best_checkpoint_is_the_best_by_bleu4_that_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    checkpoints = _run_of_checkpoints(tmp_path / "run", 3)
    scored = [(checkpoint, {"bleu4": bleu4}) for checkpoint, bleu4 in zip(checkpoints, (0.2, 0.3, 0.1))]
    assert best_loadable(scored) == scored[1]
    (Path(checkpoints[1].path) / "vocab.json").write_text("[]")
    with caplog.at_level(logging.WARNING, logger="raycap.train"):
        assert best_loadable(scored) == scored[0]
    assert f"{checkpoints[1].path} does not load" in caplog.text
    assert best_loadable([]) == (None, {})


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_run_with_s3_storage_keeps_the_secret_key_out_of_output_and_logs(
    features: str, s3_server: S3Server, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bucket = s3_server.make_bucket()
    cfg = _job(features, f"s3://{bucket}/runs", "secret", epochs=1)
    outcome = train_models([cfg])["attention"]
    assert outcome.best_checkpoint is not None
    epoch_lines = _session_log_lines("[raycap] attention epoch 1/1")
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert "[raycap] training attention as run" in output and epoch_lines  # what was searched is the job's output
    assert s3_server.secret_key not in output
    assert not _session_log_lines(s3_server.secret_key, timeout_s=0)
    # TensorBoard events reached the bucket and read back.
    (events,) = storage.list_files(f"s3://{bucket}/runs/secret/{TENSORBOARD_DIR}")
    (tmp_path / events.uri.rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(events.uri))
    assert [step for step, _ in _scalars(tmp_path)["val/bleu4"]] == [0]
