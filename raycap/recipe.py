"""The training recipe in plain PyTorch: one epoch, validation and captioning.

Ray Train (`raycap.train`) runs these functions inside its workers; they know nothing of Ray, so
they are tested and reused directly (evaluation, the demo).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raycap.data.vocab import Vocab
from raycap.models.beam import Caption, beam_search
from raycap.models.decoders import caption_loss, trim_padding

Batch = tuple[torch.Tensor, torch.Tensor]  # features (B, P, C), captions (B*k, L) int, k per image
ImageBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # image ids (B,), features (B, P, C), captions (B, k, L)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation knobs; defaults follow the reference recipe."""

    epochs: int = 20
    batch_size: int = 32  # per worker
    lr: float = 4e-4
    grad_clip: float = 5.0
    alpha_c: float = 1.0  # weight of the doubly stochastic attention term
    lr_decay: float = 0.8  # multiply lr by this after `decay_patience` epochs without a better BLEU-4
    decay_patience: int = 8
    early_stop_patience: int = 20  # stop after this many epochs without a better BLEU-4
    beam_size: int = 3
    max_decode_len: int = 50
    eval_batch_size: int = 64
    mixed_precision: bool = True  # used on GPU only
    seed: int = 0


def _unwrap(model: nn.Module) -> nn.Module:
    """The decoder inside a DistributedDataParallel wrapper, or the model itself."""
    return getattr(model, "module", model)


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    pad_id: int,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass of teacher forcing over `batches`; returns mean loss and cross-entropy per batch."""
    model.train()
    device = next(model.parameters()).device
    use_amp = scaler is not None and device.type == "cuda"
    totals, batches_seen = np.zeros(2), 0
    for features, captions in batches:
        features = features.to(device, torch.float32, non_blocking=True)  # (B, P, C)
        captions = trim_padding(captions.to(device, torch.long, non_blocking=True), pad_id)  # (B*k, T+1)
        with torch.autocast(device.type, enabled=use_amp):
            loss, ce = caption_loss(model(features, captions), captions, pad_id, cfg.alpha_c)
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        totals += (loss.item(), ce.item())
        batches_seen += 1
    if batches_seen == 0:
        raise ValueError("no training batches: is the training split empty?")
    loss, ce = totals / batches_seen
    return {"train_loss": loss, "train_ce": ce}


@torch.no_grad()
def validate(
    model: nn.Module, batches: Iterable[ImageBatch], vocab: Vocab, cfg: TrainConfig
) -> tuple[float, dict[int, str]]:
    """One pass over validation images: (teacher-forced CE per non-pad token, beam-search captions)."""
    decoder = _unwrap(model)
    decoder.eval()
    device = next(decoder.parameters()).device
    total, tokens, predictions = 0.0, 0, {}
    for image_ids, features, captions in batches:
        features = features.to(device, torch.float32)  # (B, P, C)
        captions = trim_padding(captions.to(device, torch.long).flatten(0, 1), vocab.pad_id)  # (B*k, T+1)
        _, ce = caption_loss(decoder(features, captions), captions, vocab.pad_id, cfg.alpha_c)
        n = int((captions[:, 1:] != vocab.pad_id).sum())
        total, tokens = total + float(ce) * n, tokens + n
        found = beam_search(decoder, features, vocab.start_id, vocab.end_id, cfg.beam_size, cfg.max_decode_len)
        predictions.update({int(i): vocab.decode(c[0].tokens) for i, c in zip(image_ids.tolist(), found)})
    return total / max(tokens, 1), predictions


def caption_features(
    model: nn.Module,
    features: np.ndarray | torch.Tensor,
    vocab: Vocab,
    beam_size: int = 3,
    max_len: int = 50,
    batch_size: int = 64,
    num_captions: int = 1,
) -> list[list[Caption]]:
    """Beam-search captions for features (N, P, C), `batch_size` images per search."""
    decoder = _unwrap(model)
    decoder.eval()
    device = next(decoder.parameters()).device
    out: list[list[Caption]] = []
    for start in range(0, len(features), batch_size):
        chunk = torch.as_tensor(features[start : start + batch_size]).to(device, torch.float32)
        out.extend(
            beam_search(decoder, chunk, vocab.start_id, vocab.end_id, beam_size, max_len, num_captions=num_captions)
        )
    return out


class Plateau:
    """Tracks the best validation BLEU-4: when to decay the learning rate and when to stop."""

    def __init__(self, cfg: TrainConfig, best: float = -math.inf, since_best: int = 0) -> None:
        self.cfg, self.best, self.since_best = cfg, best, since_best

    def update(self, score: float) -> bool:
        """Record an epoch's score; True if it is the best so far."""
        if score > self.best:
            self.best, self.since_best = score, 0
            return True
        self.since_best += 1
        return False

    @property
    def should_decay(self) -> bool:
        return self.since_best > 0 and self.since_best % self.cfg.decay_patience == 0

    @property
    def should_stop(self) -> bool:
        return self.since_best >= self.cfg.early_stop_patience


def decay_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Multiply every group's learning rate by `factor`; returns the new rate of the first group."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
    return optimizer.param_groups[0]["lr"]
