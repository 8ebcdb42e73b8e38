"""A trained captioner in a folder or under an s3:// prefix: the one reader and writer of checkpoints.

Layout: `model.safetensors` (decoder weights), `vocab.json`, `meta.json` (format version, encoder/
decoder/train configs, epoch, metrics, and under "data" what it was trained on: feature root, split
roles and the count and SHA-256 of the id files), `train_ids.npy` and `select_ids.npy` (the image ids
of its train and selection splits) and, for resuming, `optimizer.pt` (tensors and numbers only) and
`train_state.json` (the recipe's counters). meta.json is written last, so a half-written checkpoint
has none and is not one.

Every stage reads checkpoints through this module, local or `s3://` alike (`raycap.storage`), and
every read starts with `read_meta`: one parser and one format check. Nothing is unpickled: weights
go through safetensors, id files through `allow_pickle=False` and the optimizer state through
`weights_only=True`, so a planted pickle is refused, not run. A file that is missing, truncated or
malformed (an id file that does not match its digest too) raises `CheckpointError` naming it, which
lets a resume skip a damaged checkpoint for an older one.

A user names a checkpoint by its folder, or by its run (`resolve_checkpoint`): the run folder or
`<run>/best` is the run's best checkpoint by the selection split's BLEU-4, `<run>/latest` its newest.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from raycap import storage
from raycap.data.splits import TrainingData, ids_digest
from raycap.data.vocab import Vocab
from raycap.models.decoders import Decoder, DecoderConfig, build_decoder
from raycap.models.encoder_config import EncoderConfig

FORMAT = "raycap-checkpoint-v1"
META_FILE, VOCAB_FILE, WEIGHTS_FILE = "meta.json", "vocab.json", "model.safetensors"
OPTIMIZER_FILE, STATE_FILE = "optimizer.pt", "train_state.json"
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


@dataclass(frozen=True)
class Meta:
    """A checkpoint's meta.json, parsed and checked; `data` is its raw "data" entry (None if absent)."""

    encoder: EncoderConfig
    decoder: DecoderConfig
    epoch: int
    metrics: dict[str, float]
    extra: dict[str, Any]
    data: dict[str, Any] | None


@dataclass(frozen=True)
class TrainState:
    """The recipe's counters that a resumed run goes on from."""

    epoch: int  # the last epoch done
    lr: float  # after any decay, before warmup
    best_bleu4: float
    since_best: int  # epochs since the best BLEU-4


@dataclass
class Resume:
    """What a training worker resumes from: decoder weights, optimizer state and the recipe's counters."""

    decoder: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    state: TrainState


def save_checkpoint(
    checkpoint: str | Path,
    model: CaptionModel,
    optimizer: torch.optim.Optimizer | None = None,
    state: TrainState | None = None,
) -> str:
    """Write `model` (and, for resuming, the optimizer state and the recipe's counters) to a folder
    or s3:// prefix; returns it as an absolute path or URI."""
    uri = storage.absolute(str(checkpoint))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.decoder.state_dict().items()}
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), save_tensors(weights))
    storage.write_bytes(storage.join(uri, VOCAB_FILE), model.vocab.to_json().encode("utf-8"))
    meta = {
        "format": FORMAT,
        "encoder": dataclasses.asdict(model.encoder_cfg),
        "decoder": dataclasses.asdict(model.decoder_cfg),
        "epoch": model.epoch,
        "metrics": model.metrics,
        "extra": model.extra,
    }
    if model.data is not None:
        meta["data"] = _save_data(uri, model.data)
    if optimizer is not None:
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        storage.write_bytes(storage.join(uri, OPTIMIZER_FILE), buffer.getvalue())
    if state is not None:
        storage.write_bytes(storage.join(uri, STATE_FILE), json.dumps(dataclasses.asdict(state)).encode("utf-8"))
    storage.write_bytes(storage.join(uri, META_FILE), json.dumps(meta, indent=2).encode("utf-8"))
    return uri


def read_meta(checkpoint: str | Path) -> Meta:
    """A checkpoint's meta.json alone (no weights): the one place its format version is checked."""
    uri = storage.join(str(checkpoint), META_FILE)
    missing = f"{checkpoint} is not a raycap checkpoint: {META_FILE} is missing"
    meta = _read(uri, "JSON file", json.loads, missing)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{uri}: unknown checkpoint format {found!r}; this raycap reads {FORMAT!r}")
    try:
        return Meta(
            EncoderConfig(**meta["encoder"]), DecoderConfig(**meta["decoder"]),
            meta["epoch"], meta["metrics"], meta["extra"], meta.get("data"),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{uri} is malformed: {type(exc).__name__}: {exc}") from exc


def load_checkpoint(checkpoint: str | Path, device: str | torch.device = "cpu") -> CaptionModel:
    """Load a checkpoint (folder or s3:// prefix) written by `save_checkpoint`; the decoder is in eval
    mode on `device`."""
    uri = str(checkpoint)
    meta = read_meta(uri)
    vocab = _read(storage.join(uri, VOCAB_FILE), "vocabulary", lambda data: Vocab.from_json(data.decode("utf-8")))
    data = _load_data(uri, meta.data) if meta.data is not None else None
    decoder = build_decoder(meta.decoder, len(vocab), meta.encoder.feature_dim, meta.encoder.grid)
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    weights = _read(weights_uri, "safetensors file", load_tensors)
    try:
        decoder.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_uri} does not fit the decoder in {META_FILE}: {exc}") from exc
    decoder.to(device).eval()
    return CaptionModel(decoder, vocab, meta.encoder, meta.decoder, meta.epoch, meta.metrics, meta.extra, data)


def load_optimizer_state(checkpoint: str | Path) -> dict[str, Any] | None:
    """The optimizer state saved with a checkpoint, or None if it has none; never unpickles objects."""
    uri = storage.join(str(checkpoint), OPTIMIZER_FILE)
    if not storage.exists(uri):
        return None
    return _read(uri, "weights-only torch file", lambda data: _load_weights_only(uri, data))


def read_state(checkpoint: str | Path) -> TrainState:
    """The recipe's counters saved with a checkpoint; CheckpointError if missing or malformed."""
    state_uri = storage.join(str(checkpoint), STATE_FILE)
    counters = _read(state_uri, "JSON file", json.loads)
    try:
        return TrainState(**counters)
    except TypeError as exc:
        fields = [f.name for f in dataclasses.fields(TrainState)]
        raise CheckpointError(f"{state_uri} must hold exactly {fields}, got {counters!r}") from exc


def load_resume(checkpoint: str | Path) -> Resume:
    """Everything a resumed training run needs; CheckpointError if any part is missing or damaged."""
    uri = str(checkpoint)
    decoder = load_checkpoint(uri).decoder.state_dict()
    return Resume(decoder, load_optimizer_state(uri), read_state(uri))


def _checkpoint_folders(under: str) -> list[str]:
    """Every `checkpoint_*` folder with a meta.json under `under` (recursive), sorted."""
    try:
        metas = storage.list_files(under, [f"/{META_FILE}"])
    except FileNotFoundError:
        return []
    folders = [info.uri[: -len(META_FILE) - 1] for info in metas]
    return [f for f in folders if f.rsplit("/", 1)[-1].startswith("checkpoint_")]


def run_checkpoints(run: str | Path) -> list[tuple[str, Meta]]:
    """The checkpoints of a training run's folder (or s3:// prefix) whose meta.json reads, oldest first
    (Ray Train names them by time); [] when it is no run. Damaged ones are left out."""
    run = str(run).rstrip("/")
    found = []
    for folder in _checkpoint_folders(run):
        if folder.rsplit("/", 1)[0] == run:
            try:
                found.append((folder, read_meta(folder)))
            except CheckpointError:
                continue
    return found


def resolve_checkpoint(name: str | Path) -> tuple[str, str | None]:
    """The checkpoint a user means: a checkpoint folder itself, or a run's (the run folder or
    `<run>/best`: the best by the selection split's BLEU-4; `<run>/latest`: the newest). Returns it
    with a line saying which was picked (None for a checkpoint folder); CheckpointError naming where
    the checkpoints are when `name` is neither."""
    uri = storage.absolute(str(name)).rstrip("/")
    if storage.exists(storage.join(uri, META_FILE)):
        return uri, None
    run, pointer = uri, "best"
    if uri.rsplit("/", 1)[-1] in ("best", "latest") and not storage.exists(uri):
        run, pointer = uri.rsplit("/", 1)
    checkpoints = run_checkpoints(run) if storage.exists(run) else []
    if not checkpoints:
        runs = sorted({f.rsplit("/", 2)[-2] for f in _checkpoint_folders(run)}) if storage.exists(run) else []
        where = f"; its runs: {', '.join(runs)}" if runs else ""
        what = f"is not a raycap checkpoint ({META_FILE} is missing) nor a training run with checkpoints"
        raise CheckpointError(
            f"checkpoint {name} {what if storage.exists(uri) else 'does not exist'}{where}: "
            "give a checkpoint folder (<run>/checkpoint_*), a run folder (<storage path>/<run name>: its best "
            "checkpoint), <run>/best or <run>/latest"
        )
    if pointer == "latest":
        uri, meta = checkpoints[-1]
    else:  # ties go to the older checkpoint, as in training's own pick
        uri, meta = max(checkpoints, key=lambda pair: pair[1].metrics.get("bleu4", -float("inf")))
    bleu4 = meta.metrics.get("bleu4")
    score = f", BLEU-4 {bleu4:.3f} on its selection split" if bleu4 is not None else ""
    return uri, f"{pointer} checkpoint of run {run}: {uri} (epoch {meta.epoch + 1}{score})"


def pick_checkpoint(name: str | Path) -> str:
    """What a job does with a --checkpoint before any work: the checkpoint `name` means
    (`resolve_checkpoint`), its meta.json checked, saying which it picked when `name` was a run."""
    checkpoint, note = resolve_checkpoint(name)
    read_meta(checkpoint)
    if note:
        print(f"[raycap] using the {note}", flush=True)
    return checkpoint


def _save_data(uri: str, data: TrainingData) -> dict[str, Any]:
    """Write the id files; returns meta.json's "data" entry."""
    entry: dict[str, Any] = {
        "features": data.features,
        "train_splits": list(data.train_splits),
        "select_split": data.select_split,
        "report_split": data.report_split,
    }
    for name, file in ID_FILES.items():
        ids = np.unique(np.asarray(getattr(data, name), dtype=np.int64))  # (N,) sorted
        buffer = io.BytesIO()
        np.save(buffer, ids, allow_pickle=False)
        storage.write_bytes(storage.join(uri, file), buffer.getvalue())
        entry[name] = {"file": file, "count": len(ids), "sha256": ids_digest(ids)}
    return entry


def _load_data(uri: str, entry: dict[str, Any]) -> TrainingData:
    """meta.json's "data" entry and its id files, each checked against its count and digest."""
    try:
        recorded = {name: (entry[name]["count"], entry[name]["sha256"]) for name in ID_FILES}
        roles = entry["features"], tuple(entry["train_splits"]), entry["select_split"], entry["report_split"]
    except (KeyError, TypeError) as exc:
        meta_uri = storage.join(uri, META_FILE)
        raise CheckpointError(f'{meta_uri}: malformed "data": {type(exc).__name__}: {exc}') from exc
    ids = {}
    for name, file in ID_FILES.items():
        file_uri = storage.join(uri, file)
        ids[name] = _read(
            file_uri, "NumPy id file", lambda data: np.load(io.BytesIO(data), allow_pickle=False).astype(np.int64)
        )  # (N,)
        if (len(ids[name]), ids_digest(ids[name])) != recorded[name]:
            raise CheckpointError(f"{file_uri} does not match the count and SHA-256 recorded in {META_FILE}")
    return TrainingData(*roles, **ids)


def _load_weights_only(uri: str, data: bytes) -> Any:
    """torch.load that refuses pickled objects (they can run code) with a short reason instead of torch's advice."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = found.group(1) if found else "not a tensor or number"
        raise CheckpointError(
            f"{uri} holds a pickled Python object ({what}): refused, since unpickling it could run code"
        ) from None


def _read(uri: str, what: str, parse: Callable[[bytes], T], missing: str | None = None) -> T:
    """`parse` of the file's bytes, with a missing file (message `missing`) or any parse failure
    raised as a CheckpointError that names the file and the reason."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        reason = missing or f"{uri} is missing"
        where = f" ({exc})" if storage.is_s3(uri) else ""  # names the endpoint, or a missing bucket
        raise CheckpointError(reason + where) from None
    try:
        return parse(data)
    except CheckpointError:
        raise
    except Exception as exc:  # each reader fails its own way (JSONDecodeError, SafetensorError, UnpicklingError, ...)
        raise CheckpointError(f"{uri} is not a readable {what}: {type(exc).__name__}: {exc}") from exc
