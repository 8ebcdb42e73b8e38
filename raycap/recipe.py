"""The training recipe in plain PyTorch: the step plan, one epoch, validation and captioning.

A step is counted in captions, all workers together, as in the reference (32 captions at lr 4e-4);
other step sizes scale the learning rate by `TrainConfig.lr_rule`.

Ray Train (`raycap.train`) runs these functions inside its workers; they know nothing of Ray, so
they are tested and reused directly (evaluation, the demo).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raycap.config import check_bounds, file_only, flag
from raycap.data.vocab import Vocab
from raycap.models.beam import Caption, beam_search
from raycap.models.decoders import caption_loss, trim_padding
from raycap.models.decoding import BEAM_SIZE, MAX_DECODE_LEN

Batch = tuple[torch.Tensor, torch.Tensor]  # features (B, P, C), captions (B*k, L) int, k per image
ImageBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # image ids (B,), features (B, P, C), captions (B, k, L)

REFERENCE_CAPTIONS_PER_STEP = 32  # the reference's batch: 32 captions per optimizer step at lr 4e-4
LR_RULES = ("linear", "none")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation knobs; defaults follow the reference recipe."""

    epochs: int = flag("--epochs", 20, at_least=1)
    captions_per_step: int = flag(
        "--captions-per-step", REFERENCE_CAPTIONS_PER_STEP, at_least=1,
        help="captions per optimizer step, all workers together (a multiple of --num-workers)",
    )
    lr: float = flag("--lr", 4e-4, above=0, help="learning rate at 32 captions per step")
    lr_rule: str = flag(
        "--lr-rule", "linear", choices=LR_RULES,
        help="linear: lr x captions-per-step / 32, warmed up; none: --lr as given",
    )
    warmup_epochs: float = flag("--warmup-epochs", 1.0, at_least=0, help="linear rule: epochs to ramp from --lr to the scaled lr")
    grad_clip: float = flag("--grad-clip", 5.0, above=0)
    alpha_c: float = flag("--alpha-c", 1.0, at_least=0, help="doubly stochastic attention weight")
    lr_decay: float = flag("--lr-decay", 0.8, above=0, at_most=1, help="lr factor after --decay-patience epochs without better BLEU-4")
    decay_patience: int = flag("--decay-patience", 8, at_least=1, help="epochs without better BLEU-4 before lr decay")
    early_stop_patience: int = flag(
        "--early-stop-patience", 20, at_least=1, help="stop after this many epochs without better BLEU-4"
    )
    beam_size: int = flag("--beam-size", BEAM_SIZE, at_least=1, help="beam size for validation captions")
    max_decode_len: int = file_only(MAX_DECODE_LEN)  # words per validation caption at most
    eval_batch_size: int = file_only(64)
    mixed_precision: bool = file_only(True)  # used on GPU only
    seed: int = flag("--seed", 0)

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule must be one of {list(LR_RULES)}, got {self.lr_rule!r}")

    @property
    def scaled_lr(self) -> float:
        """The learning rate at `captions_per_step`, by `lr_rule` from the 32-caption reference."""
        if self.lr_rule == "none":
            return self.lr
        return self.lr * self.captions_per_step / REFERENCE_CAPTIONS_PER_STEP


@dataclass(frozen=True)
class TrainPlan:
    """One epoch cut into optimizer steps, and their learning rate; `plan_training` makes it.

    Every image gives `captions_per_image` (image, caption) pairs per epoch; Ray Train's equal
    split hands each worker `images // workers` images (the remainder waits for the next epoch's
    shuffle), so every worker takes the same number of steps, as DDP needs.
    """

    images: int  # training images: with features and at least one caption
    captions: int  # their captions in the data
    captions_per_image: int  # pairs per image and epoch (images with fewer captions repeat theirs)
    captions_per_step: int  # all workers together
    workers: int
    per_worker: int  # captions per step on each worker
    images_per_worker: int  # per epoch
    steps_per_epoch: int
    base_lr: float  # configured, for 32 captions per step
    lr: float  # after the lr rule
    lr_rule: str
    warmup_steps: int

    def warmup_factor(self, step: int) -> float:
        """Multiplier of `lr` at optimizer step `step` of the run: from base_lr / lr up to 1, linearly."""
        if step >= self.warmup_steps:
            return 1.0
        start = self.base_lr / self.lr
        return start + (1.0 - start) * step / self.warmup_steps

    def describe(self) -> list[str]:
        """The plan in words, one line per topic."""
        pairs = self.images_per_worker * self.captions_per_image
        rule = (
            f"{self.base_lr:.2e} x {self.captions_per_step}/{REFERENCE_CAPTIONS_PER_STEP} (linear rule)"
            if self.lr_rule == "linear"
            else f"as configured (lr_rule none; the reference is {REFERENCE_CAPTIONS_PER_STEP} captions per step)"
        )
        warmup = (
            f", warmed up from {self.base_lr:.2e} over the first {self.warmup_steps:,} steps"
            if self.warmup_steps
            else ""
        )
        return [
            f"{self.images:,} images with {self.captions:,} captions; an epoch takes {self.captions_per_image} "
            f"per image: {pairs * self.workers:,} captions",
            f"{self.captions_per_step} captions per step ({self.per_worker} per worker x {self.workers} "
            f"worker{'s' if self.workers > 1 else ''}): "
            f"{self.steps_per_epoch:,} steps per epoch, each worker {self.images_per_worker:,} images, {pairs:,} captions",
            f"lr {self.lr:.2e} = {rule}{warmup}",
        ]


def plan_training(images: int, captions: int, captions_per_image: int, cfg: TrainConfig, workers: int) -> TrainPlan:
    """Steps per epoch and learning rate for `images` training images (`captions` captions) on `workers` workers."""
    step = cfg.captions_per_step
    if workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {workers}")
    if step % workers:
        low, high = step // workers * workers, -(-step // workers) * workers
        hint = " or ".join(str(n) for n in dict.fromkeys((low, high)) if n)
        raise ValueError(
            f"captions_per_step {step} does not divide among {workers} workers: DDP steps need the same "
            f"number of captions on each; use a multiple of {workers} (e.g. {hint})"
        )
    if images < workers:
        raise ValueError(f"{images} training images cannot feed {workers} workers: each needs at least one image")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    per_worker, images_per_worker = step // workers, images // workers
    steps = -(-images_per_worker * captions_per_image // per_worker)  # the last step may be short
    lr = cfg.scaled_lr
    warmup = math.ceil(cfg.warmup_epochs * steps) if lr > cfg.lr else 0  # steps smaller than 32 need none
    return TrainPlan(
        images, captions, captions_per_image, step, workers, per_worker, images_per_worker, steps,
        cfg.lr, lr, cfg.lr_rule, warmup,
    )  # fmt: skip


def caption_steps(
    image_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], per_step: int, generator: torch.Generator
) -> Iterator[Batch]:
    """Image batches (features (B, P, C), captions (B, k, L)) -> steps of `per_step` (image, caption)
    pairs, shuffled within each batch and carried across batches; only the last step may be short.

    Features cross the network once per image and are repeated per caption here, as the reference
    feeds every caption with its image.
    """
    held: list[tuple[torch.Tensor, torch.Tensor]] = []  # pairs not yet in a step
    count = 0
    for features, captions in image_batches:
        k = captions.size(1)
        flat = captions.flatten(0, 1)  # (B*k, L), row i is caption i % k of image i // k
        order = torch.randperm(len(flat), generator=generator)  # (B*k,)
        while len(order):
            take, order = order[: per_step - count], order[per_step - count :]
            held.append((features[take // k], flat[take]))  # (n, P, C), (n, L)
            count += len(take)
            if count == per_step:
                yield torch.cat([f for f, _ in held]), torch.cat([c for _, c in held])
                held, count = [], 0
    if count:
        yield torch.cat([f for f, _ in held]), torch.cat([c for _, c in held])


def build_optimizer(model: nn.Module, lr: float) -> torch.optim.Adam:
    """The reference's Adam, as torch's fused kernel (one pass over all parameters, CPU or GPU)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def _unwrap(model: nn.Module) -> nn.Module:
    """The decoder inside a DistributedDataParallel wrapper, or the model itself."""
    return getattr(model, "module", model)


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    pad_id: int,
    lr_at: Callable[[int], float],
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass of teacher forcing over `batches`, step i at learning rate `lr_at(i)`; returns the mean
    loss and cross-entropy per step, and the number of steps."""
    model.train()
    device = next(model.parameters()).device
    use_amp = scaler is not None and device.type == "cuda"
    totals, batches_seen = np.zeros(2), 0
    for features, captions in batches:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(batches_seen)
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
    return {"train_loss": loss, "train_ce": ce, "steps": batches_seen}


@torch.no_grad()
def validate(
    model: nn.Module, batches: Iterable[ImageBatch], vocab: Vocab, cfg: TrainConfig
) -> tuple[float, dict[int, str]]:
    """One pass over validation images: (teacher-forced CE per non-pad token, beam-search captions,
    <unk> never emitted as in evaluation)."""
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
        found = beam_search(
            decoder, features, vocab.start_id, vocab.end_id, cfg.beam_size, cfg.max_decode_len, banned=(vocab.unk_id,)
        )
        predictions.update({int(i): vocab.decode(c[0].tokens) for i, c in zip(image_ids.tolist(), found)})
    return total / max(tokens, 1), predictions


def caption_features(
    model: nn.Module,
    features: np.ndarray | torch.Tensor,
    vocab: Vocab,
    beam_size: int = BEAM_SIZE,
    max_decode_len: int = MAX_DECODE_LEN,
    batch_size: int = 64,
    num_captions: int = 1,
    allow_unk: bool = False,
) -> list[list[Caption]]:
    """Beam-search captions for features (N, P, C), `batch_size` images per search; <unk> is never
    emitted unless `allow_unk`."""
    decoder = _unwrap(model)
    decoder.eval()
    device = next(decoder.parameters()).device
    out: list[list[Caption]] = []
    for start in range(0, len(features), batch_size):
        chunk = torch.as_tensor(features[start : start + batch_size]).to(device, torch.float32)
        out.extend(
            beam_search(
                decoder, chunk, vocab.start_id, vocab.end_id, beam_size, max_decode_len, num_captions=num_captions,
                banned=() if allow_unk else (vocab.unk_id,),
            )  # fmt: skip
        )
    return out


class Plateau:
    """Tracks the best BLEU-4 on the selection split: when to decay the learning rate and when to stop."""

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
