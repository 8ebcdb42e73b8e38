"""raycap.models.checkpoint, the one reader and writer of checkpoints: an s3:// round trip, and the
format version checked by every stage that reads one (training's resume, evaluate, Serve's replicas
and its pre-flight). Evaluating an s3:// checkpoint: tests/test_evaluate.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from helpers import job_module

from raycap.data.splits import TrainingData
from raycap.data.vocab import Vocab
from raycap.evaluate import EvaluateConfig, evaluate_checkpoint
from raycap.models.checkpoint import (
    FORMAT,
    META_FILE,
    CaptionModel,
    CheckpointError,
    TrainState,
    load_checkpoint,
    load_resume,
    read_meta,
    save_checkpoint,
)
from raycap.models.decoders import DecoderConfig, build_decoder
from raycap.models.encoder_config import EncoderConfig
from raycap.serve import CaptionDecoder, ImageEncoder, load_model

if TYPE_CHECKING:
    from conftest import S3Server

ENCODER = EncoderConfig("resnet18", "none", grid=2, image_size=64)
NEWER = "raycap-checkpoint-v2"


def _save(uri: str) -> tuple[CaptionModel, dict, TrainState]:
    """A trained-looking checkpoint at `uri`: weights after one Adam step, a record of its training
    images and the resume counters; returns what was saved."""
    torch.manual_seed(0)
    vocab = Vocab(["a", "cat", "on", "mat"], max_words=6)
    decoder_cfg = DecoderConfig("attention", embed_dim=8, decoder_dim=8, attention_dim=8, dropout=0.0)
    decoder = build_decoder(decoder_cfg, len(vocab), ENCODER.feature_dim, ENCODER.grid)
    optimizer = torch.optim.Adam(decoder.parameters())
    features = torch.randn(2, ENCODER.grid**2, ENCODER.feature_dim)  # (B, P, C)
    decoder(features, torch.tensor([[1, 4, 5, 2], [1, 6, 7, 2]])).logits.sum().backward()
    optimizer.step()
    data = TrainingData("s3://b/features", ("train",), "val", "test", np.array([3, 1, 2]), np.array([7, 8]))
    model = CaptionModel(decoder, vocab, ENCODER, decoder_cfg, epoch=4, metrics={"bleu4": 0.25}, data=data)
    state = TrainState(epoch=4, lr=1e-3, best_bleu4=0.25, since_best=1)
    save_checkpoint(uri, model, optimizer, state)
    return model, optimizer.state_dict(), state


def _replica(deployment: object, checkpoint: str) -> object:
    """A Serve deployment's class, built and configured with `checkpoint` in this process, as a replica is."""
    replica = deployment.func_or_class()  # type: ignore[attr-defined]
    asyncio.run(replica.reconfigure({"checkpoint": checkpoint}))
    return replica


# Every stage that reads a checkpoint, called as that stage calls it.
READERS: dict[str, Callable[[str], object]] = {
    "load_checkpoint (evaluate, best checkpoint, bench)": load_checkpoint,
    "read_meta": read_meta,
    "training's resume": load_resume,
    "Serve Encoder replicas": lambda uri: _replica(ImageEncoder, uri),
    # The Decoder's multiplexed loader runs only inside a replica; this is what it calls.
    "Serve Decoder replicas' model loader": lambda uri: load_model(uri, "model"),
}
# Stages that go on to other work (features, Ray) once the checkpoint reads: only their refusal is tested.
REFUSERS: dict[str, Callable[[str], object]] = {
    **READERS,
    "evaluate": lambda uri: evaluate_checkpoint(
        EvaluateConfig(uri, str(Path(uri).parent / "features"), out=str(Path(uri).parent / "out"))
    ),
    "jobs/serve.py pre-flight": lambda uri: job_module("serve").main(["--checkpoint", uri]),
    "Serve Decoder replicas' reconfigure": lambda uri: _replica(CaptionDecoder, uri),
}


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_reads_a_sound_checkpoint(tmp_path: Path, reader: str) -> None:
    _save(str(tmp_path / "checkpoint"))
    READERS[reader](str(tmp_path / "checkpoint"))


@pytest.mark.parametrize("reader", REFUSERS)
def test_an_unknown_format_version_is_refused_by_every_reader(tmp_path: Path, reader: str) -> None:
    checkpoint = tmp_path / "checkpoint"
    _save(str(checkpoint))
    meta = json.loads((checkpoint / META_FILE).read_text())
    (checkpoint / META_FILE).write_text(json.dumps({**meta, "format": NEWER}))
    with pytest.raises(CheckpointError, match=f"unknown checkpoint format '{NEWER}'; this raycap reads '{FORMAT}'"):
        REFUSERS[reader](str(checkpoint))
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_a_checkpoint_saved_under_an_s3_prefix_loads_as_saved(s3_server: S3Server) -> None:
    uri = f"s3://{s3_server.make_bucket()}/runs/checkpoint_000004"
    model, optimizer, state = _save(uri)
    loaded = load_checkpoint(uri)
    saved = model.decoder.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.decoder.state_dict().items())
    assert (loaded.vocab, loaded.encoder_cfg, loaded.decoder_cfg) == (model.vocab, ENCODER, model.decoder_cfg)
    assert (loaded.epoch, loaded.metrics, loaded.data.train_ids.tolist()) == (4, {"bleu4": 0.25}, [1, 2, 3])
    resume = load_resume(uri)
    assert resume.state == state
    assert resume.optimizer["state"][0]["step"] == optimizer["state"][0]["step"] == 1
    assert read_meta(uri).encoder == ENCODER
