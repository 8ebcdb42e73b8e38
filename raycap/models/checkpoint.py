"""A trained captioner on disk: decoder weights, vocabulary and configs in one directory.

Layout: `model.safetensors` (decoder weights), `vocab.json`, `meta.json` (encoder/decoder/train
configs, epoch, metrics) and, for resuming, `optimizer.pt` (tensors and numbers only). Nothing is
unpickled: weights go through safetensors and the optimizer state through `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raycap.data.vocab import Vocab
from raycap.models.decoders import Decoder, DecoderConfig, build_decoder
from raycap.models.encoder import EncoderConfig

FORMAT = "raycap-checkpoint-v1"


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
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), path / "optimizer.pt")
    return path


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> CaptionModel:
    """Load a checkpoint written by `save_checkpoint`; the decoder is in eval mode on `device`."""
    path = Path(directory)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a raycap checkpoint: {meta_file.name} is missing")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: unknown checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    vocab = Vocab.load(path / "vocab.json")
    encoder_cfg = EncoderConfig(**meta["encoder"])
    decoder_cfg = DecoderConfig(**meta["decoder"])
    decoder = build_decoder(decoder_cfg, len(vocab), encoder_cfg.feature_dim)
    decoder.load_state_dict(load_file(str(path / "model.safetensors"), device="cpu"))
    decoder.to(device).eval()
    return CaptionModel(decoder, vocab, encoder_cfg, decoder_cfg, meta["epoch"], meta["metrics"], meta["extra"])


def load_optimizer_state(directory: str | Path) -> dict[str, Any] | None:
    """The optimizer state saved with a checkpoint, or None if it has none."""
    file = Path(directory) / "optimizer.pt"
    return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None
