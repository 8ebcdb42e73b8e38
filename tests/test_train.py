"""Ray Train stage: DDP on 2 CPU workers, checkpoints and resume (`ray job submit` of the training
job: tests/test_end_to_end.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raycap.models.checkpoint import load_checkpoint, load_optimizer_state
from raycap.models.decoders import DecoderConfig
from raycap.recipe import TrainConfig
from raycap.train import TrainJobConfig, train

pytestmark = pytest.mark.integration

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
