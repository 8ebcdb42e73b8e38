"""A trained captioner on disk: decoder weights, vocabulary and configs in one directory.

Layout: `model.safetensors` (decoder weights), `vocab.json`, `meta.json` (encoder/decoder/train
configs, epoch, metrics, and under "data" what it was trained on: feature root, split roles and the
count and SHA-256 of the id files), `train_ids.npy` and `select_ids.npy` (the image ids of its
train and selection splits) and, for resuming, `optimizer.pt` (tensors and numbers only). Nothing is
unpickled: weights go through safetensors, id files through `allow_pickle=False` and the optimizer
state through `weights_only=True`, so a planted pickle is refused, not run. A file that is missing,
truncated or malformed (an id file that does not match its digest too) raises `CheckpointError`
naming it, which lets a resume skip a damaged checkpoint for an older one.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raycap.data.splits import TrainingData, ids_digest
from raycap.data.vocab import Vocab
from raycap.models.decoders import Decoder, DecoderConfig, build_decoder
from raycap.models.encoder import EncoderConfig

FORMAT = "raycap-checkpoint-v1"
ID_FILES = {"train_ids": "train_ids.npy", "select_ids": "select_ids.npy"}  # TrainingData field -> file
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: a file is missing, truncated or malformed (the message names it)."""


@dataclass
class CaptionModel:
    """Everything needed to caption features: the decoder, its vocabulary and the encoder it expects."""

    decoder: Decoder
    vocab: Vocab
    encoder_cfg: EncoderConfig
    decoder_cfg: DecoderConfig
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the training config
    data: TrainingData | None = None  # None in checkpoints not written by training


def save_checkpoint(directory: str | Path, model: CaptionModel, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write `model` (and optionally the optimizer state) into `directory`; returns it."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.decoder.state_dict().items()}
    save_file(weights, str(path / "model.safetensors"))
    model.vocab.save(path / "vocab.json")
    meta = {
        "format": FORMAT,
        "encoder": dataclasses.asdict(model.encoder_cfg),
        "decoder": dataclasses.asdict(model.decoder_cfg),
        "epoch": model.epoch,
        "metrics": model.metrics,
        "extra": model.extra,
    }
    if model.data is not None:
        meta["data"] = _save_data(path, model.data)
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), path / "optimizer.pt")
    return path


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> CaptionModel:
    """Load a checkpoint written by `save_checkpoint`; the decoder is in eval mode on `device`."""
    path = Path(directory)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a raycap checkpoint: meta.json is missing")
    meta = _read(path / "meta.json", "JSON file", lambda file: json.loads(file.read_text(encoding="utf-8")))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path / 'meta.json'}: unknown checkpoint format {found!r}, expected {FORMAT!r}")
    vocab = _read(path / "vocab.json", "vocabulary", Vocab.load)
    try:
        encoder_cfg = EncoderConfig(**meta["encoder"])
        decoder_cfg = DecoderConfig(**meta["decoder"])
        epoch, metrics, extra = meta["epoch"], meta["metrics"], meta["extra"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / 'meta.json'} is malformed: {type(exc).__name__}: {exc}") from exc
    data = _load_data(path, meta["data"]) if "data" in meta else None
    decoder = build_decoder(decoder_cfg, len(vocab), encoder_cfg.feature_dim, encoder_cfg.grid)
    weights = _read(path / "model.safetensors", "safetensors file", lambda file: load_file(str(file), device="cpu"))
    try:
        decoder.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path / 'model.safetensors'} does not fit the decoder in meta.json: {exc}") from exc
    decoder.to(device).eval()
    return CaptionModel(decoder, vocab, encoder_cfg, decoder_cfg, epoch, metrics, extra, data)


def _save_data(path: Path, data: TrainingData) -> dict[str, Any]:
    """Write the id files; returns meta.json's "data" entry."""
    entry: dict[str, Any] = {
        "features": data.features,
        "train_splits": list(data.train_splits),
        "select_split": data.select_split,
        "report_split": data.report_split,
    }
    for name, file in ID_FILES.items():
        ids = np.unique(np.asarray(getattr(data, name), dtype=np.int64))  # (N,) sorted
        np.save(path / file, ids, allow_pickle=False)
        entry[name] = {"file": file, "count": len(ids), "sha256": ids_digest(ids)}
    return entry


def _load_data(path: Path, entry: dict[str, Any]) -> TrainingData:
    """meta.json's "data" entry and its id files, each checked against its count and digest."""
    try:
        recorded = {name: (entry[name]["count"], entry[name]["sha256"]) for name in ID_FILES}
        roles = entry["features"], tuple(entry["train_splits"]), entry["select_split"], entry["report_split"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / 'meta.json'}: malformed \"data\": {type(exc).__name__}: {exc}") from exc
    ids = {}
    for name, file in ID_FILES.items():
        ids[name] = _read(path / file, "NumPy id file", lambda f: np.load(f, allow_pickle=False).astype(np.int64))
        if (len(ids[name]), ids_digest(ids[name])) != recorded[name]:
            raise CheckpointError(f"{path / file} does not match the count and SHA-256 recorded in meta.json")
    return TrainingData(*roles, **ids)


def load_optimizer_state(directory: str | Path) -> dict[str, Any] | None:
    """The optimizer state saved with a checkpoint, or None if it has none; never unpickles objects."""
    file = Path(directory) / "optimizer.pt"
    if not file.is_file():
        return None
    return _read(file, "weights-only torch file", _load_tensors)


def _load_tensors(file: Path) -> Any:
    """torch.load that refuses pickled objects (they can run code) with a short reason instead of torch's advice."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = found.group(1) if found else "not a tensor or number"
        raise CheckpointError(
            f"{file} holds a pickled Python object ({what}): refused, since unpickling it could run code"
        ) from None


def _read(file: Path, what: str, load: Callable[[Path], T]) -> T:
    """`load(file)`, with any failure raised as a CheckpointError that names the file and the reason."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        return load(file)
    except CheckpointError:
        raise
    except Exception as exc:  # each reader fails its own way (JSONDecodeError, SafetensorError, UnpicklingError, ...)
        raise CheckpointError(f"{file} is not a readable {what}: {type(exc).__name__}: {exc}") from exc
