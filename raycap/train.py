"""Ray Train stage: DDP training of a decoder from extracted features, with per-epoch evaluation.

Data: Ray Data reads the Parquet features (`raycap.feature_store` layout), attaches each image's
tokenised captions, and streams image rows to the workers (`get_dataset_shard`), shuffled every
epoch. A row carries all `captions_per_image` captions of its image, so every (image, caption)
pair is an example each epoch while the image features cross the network once, not five times.

Every epoch each worker validates its share of the validation images (loss and beam search); the
captions are gathered and scored with BLEU-1..4 and CIDEr-D, and rank 0 reports a checkpoint. The
best checkpoint by BLEU-4 is kept, and rerunning with the same run name resumes from the latest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raycap import feature_store as fstore
from raycap import storage
from raycap.metrics import score_captions
from raycap.models.checkpoint import CaptionModel, load_checkpoint, load_optimizer_state, save_checkpoint
from raycap.models.decoders import DecoderConfig, build_decoder
from raycap.recipe import Plateau, TrainConfig, decay_lr, train_epoch, validate

STATE_FILE = "train_state.json"


@dataclass(frozen=True)
class TrainJobConfig:
    """One training run of one decoder on Ray."""

    features: str  # extraction output root (folder or s3:// prefix)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    num_workers: int = 2
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    captions_per_image: int = 5
    train_split: str = "train"
    val_split: str = "val"
    storage_path: str = "~/raycap_runs"  # folder or s3:// prefix for checkpoints and results
    run_name: str | None = None  # default: raycap-{decoder kind}; the same name resumes
    max_failures: int = 2  # worker failures retried from the last checkpoint
    keep_checkpoints: int = 2  # best by BLEU-4; the latest is always kept too
    s3_endpoint: str | None = None

    @property
    def name(self) -> str:
        return self.run_name or f"raycap-{self.decoder.kind}"


@dataclass
class TrainOutcome:
    """Where a run's results went and its best validation figures."""

    run_dir: str
    best_checkpoint: str | None
    best_metrics: dict[str, float]
    last_metrics: dict[str, float]


@functools.lru_cache(maxsize=4)
def _caption_index(uri_root: str, split: str, per_image: int, endpoint: str | None) -> dict[int, np.ndarray]:
    """image id -> (per_image, L) token ids; images with fewer captions cycle through theirs."""
    captions = fstore.read_captions(uri_root, split, endpoint)
    order = np.argsort(captions.image_ids, kind="stable")
    ids, tokens = captions.image_ids[order], captions.tokens[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    return {int(ids[s]): tokens[s:e][np.arange(per_image) % (e - s)] for s, e in zip(starts, ends)}


def attach_captions(
    batch: dict[str, np.ndarray], root: str, split: str, per_image: int, endpoint: str | None
) -> dict[str, np.ndarray]:
    """Ray Data batch of image rows -> the same rows with `captions` (B, k, L); uncaptioned images dropped."""
    index = _caption_index(root, split, per_image, endpoint)
    keep = np.array([int(i) in index for i in batch["image_id"]], dtype=bool)
    ids = batch["image_id"][keep]
    captions = np.stack([index[int(i)] for i in ids]) if len(ids) else np.zeros((0, per_image, 1), np.int32)
    return {"image_id": ids, "features": batch["features"][keep], "captions": captions}


def build_dataset(cfg: TrainJobConfig, split: str) -> ray.data.Dataset:
    """Image rows of a split: image_id, features (P, C), captions (k, L)."""
    directory = fstore.features_dir(cfg.features, split)
    if not fstore.list_shards(directory, cfg.s3_endpoint):
        raise FileNotFoundError(f"no feature shards under {directory}: run jobs/extract_features.py first")
    fs, path = storage.filesystem(directory, cfg.s3_endpoint)
    ds = ray.data.read_parquet(path, filesystem=fs).select_columns(["image_id", "features"])
    ds = ds.map_batches(
        attach_captions, fn_args=(cfg.features, split, cfg.captions_per_image, cfg.s3_endpoint), batch_format="numpy"
    )
    return ds.randomize_block_order() if split == cfg.train_split else ds


def _gather(predictions: dict[int, str]) -> dict[int, str]:
    """Union of every worker's predictions."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return predictions
    parts: list[dict[int, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, predictions)
    return {k: v for part in parts if part for k, v in part.items()}


def _weighted_mean(value: float, weight: int, device: torch.device) -> float:
    """Mean of `value` over workers weighted by `weight` (on `device`: NCCL reduces GPU tensors only)."""
    if not dist.is_available() or not dist.is_initialized():
        return value
    both = torch.tensor([value * weight, float(weight)], dtype=torch.float64, device=device)
    dist.all_reduce(both)
    return float(both[0] / both[1].clamp(min=1))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: resume if a checkpoint exists, then train/validate/report each epoch."""
    cfg: TrainJobConfig = config["job"]
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    vocab = fstore.read_vocab(cfg.features, cfg.s3_endpoint)
    spec = fstore.stored_spec(cfg.features, cfg.train_split, cfg.s3_endpoint)
    references = fstore.read_references(cfg.features, cfg.val_split, cfg.s3_endpoint)
    decoder = build_decoder(cfg.decoder, len(vocab), spec.encoder.feature_dim)

    start_epoch, plateau, lr = 0, Plateau(tcfg), tcfg.lr
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            restored = load_checkpoint(directory)
            decoder.load_state_dict(restored.decoder.state_dict())
            optimizer_state = load_optimizer_state(directory)
            state = json.loads((Path(directory) / STATE_FILE).read_text())
        start_epoch, lr = state["epoch"] + 1, state["lr"]
        plateau = Plateau(tcfg, state["best_bleu4"], state["since_best"])

    model = ray.train.torch.prepare_model(decoder)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    device = ray.train.torch.get_device()
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and tcfg.mixed_precision else None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    rank = ray.train.get_context().get_world_rank()

    for epoch in range(start_epoch, tcfg.epochs):
        batches = (
            (b["features"], b["captions"].flatten(0, 1))
            for b in train_shard.iter_torch_batches(
                batch_size=tcfg.batch_size, local_shuffle_buffer_size=8 * tcfg.batch_size, drop_last=False
            )
        )
        metrics: dict[str, Any] = {"epoch": epoch, **train_epoch(model, batches, optimizer, tcfg, vocab.pad_id, scaler)}
        val_batches = (
            (b["image_id"], b["features"], b["captions"])
            for b in val_shard.iter_torch_batches(batch_size=tcfg.eval_batch_size)
        )
        val_ce, predictions = validate(model, val_batches, vocab, tcfg)
        metrics["val_ce"] = _weighted_mean(val_ce, len(predictions), device)
        predictions = _gather(predictions)
        metrics.update(score_captions(references, predictions))
        metrics["best"] = plateau.update(metrics["bleu4"])
        if plateau.should_decay:
            lr = decay_lr(optimizer, tcfg.lr_decay)
        metrics["lr"] = lr
        with tempfile.TemporaryDirectory() as tmp:
            reported = None
            if rank == 0:
                caption_model = CaptionModel(
                    decoder, vocab, spec.encoder, cfg.decoder, epoch,
                    {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                    {"train": dataclasses.asdict(tcfg)},
                )
                save_checkpoint(tmp, caption_model, optimizer)
                state = {"epoch": epoch, "lr": lr, "best_bleu4": plateau.best, "since_best": plateau.since_best}
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
                (Path(tmp) / "predictions.json").write_text(
                    json.dumps([{"image_id": i, "caption": c} for i, c in sorted(predictions.items())])
                )
                reported = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=reported)
        if rank == 0:
            shown = ", ".join(f"{k}={metrics[k]:.3f}" for k in ("train_loss", "val_ce", "bleu4", "cider_d"))
            # sys.stdout, not print: Ray Train patches print() to log each line twice to the driver.
            sys.stdout.write(f"[raycap] {cfg.decoder.kind} epoch {epoch + 1}/{tcfg.epochs}: {shown}, lr={lr:.2e}\n")
            sys.stdout.flush()
        if plateau.should_stop:
            break


def train(cfg: TrainJobConfig) -> TrainOutcome:
    """Run (or resume) one training run on the current Ray cluster; returns where results went."""
    if not ray.is_initialized():
        ray.init()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    if storage.is_s3(cfg.storage_path):
        filesystem, storage_path = storage.filesystem(cfg.storage_path, cfg.s3_endpoint)
    else:
        filesystem, storage_path = None, os.path.abspath(os.path.expanduser(cfg.storage_path))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="bleu4", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": build_dataset(cfg, cfg.train_split), "val": build_dataset(cfg, cfg.val_split)},
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(metric="bleu4", mode="max") if result.best_checkpoints else None
    best_metrics = next((m for c, m in result.best_checkpoints if best is not None and c.path == best.path), {})
    return TrainOutcome(result.path, best.path if best else None, best_metrics, dict(result.metrics or {}))


def train_models(configs: list[TrainJobConfig]) -> dict[str, TrainOutcome]:
    """Train each configured decoder in turn, printing its config first and where its results went."""
    outcomes = {}
    for cfg in configs:
        print(f"[raycap] training {cfg.decoder.kind}: {json.dumps(dataclasses.asdict(cfg))}", flush=True)
        outcome = train(cfg)
        outcomes[cfg.decoder.kind] = outcome
        scores = ", ".join(f"{k}={outcome.best_metrics[k]:.3f}" for k in ("bleu4", "cider_d") if k in outcome.best_metrics)
        print(f"[raycap] {cfg.decoder.kind}: run {outcome.run_dir}; best checkpoint {outcome.best_checkpoint} ({scores})")
    return outcomes
