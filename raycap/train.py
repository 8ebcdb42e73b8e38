"""Ray Train stage: DDP training of a decoder from extracted features, with per-epoch evaluation.

Splits (`raycap.data.splits`): the decoder trains on every split of `train_splits`; the selection
split's scores drive lr decay, early stopping and the best checkpoint; the report split is left to
jobs/evaluate.py. Each checkpoint records them, with the ids of the training images.

Data: Ray Data reads the Parquet features (`raycap.feature_store` layout), attaches each image's
tokenised captions, and streams image rows to the workers (`get_dataset_shard`), shuffled every
epoch. A row carries `captions_per_image` captions of its image, so the features cross the network
once, not five times; each worker cuts its rows into steps of (image, caption) pairs
(`recipe.caption_steps`), `captions_per_step / num_workers` pairs per worker. Ray Train splits the
training rows equally, so every worker takes the same number of steps (`recipe.TrainPlan`, printed
at start). Selection rows are split unevenly across workers (`ValidationSplit`): an even split
would leave out up to a row per worker, and BLEU must cover the whole split.

Every epoch each worker scores its share of the selection images (loss and beam search); the
captions are gathered and scored with BLEU-1..4 and CIDEr-D, and rank 0 reports a checkpoint. The
best checkpoint by BLEU-4 is kept. A run is new unless asked to resume (`resume`): a run name in use
then gets the next free `<name>-N`; with `resume`, the named run goes on from its latest checkpoint
(a finished one says so and trains nothing).

Faults: a worker that dies is replaced and the run goes on from the last checkpoint
(`max_failures`). A checkpoint that does not load (truncated weights, garbled JSON, a pickle planted
in optimizer.pt) is skipped with a warning naming it and the reason, for the newest older one of the
run that loads; the best checkpoint returned is likewise the best that loads.

TensorBoard: rank 0 writes per-epoch scalars (train/loss, train/ce, train/lr, val/loss, val/bleu1..4,
val/cider_d; step = epoch) to `<storage_path>/<run_name>/tensorboard/`. The event file is written to a
local temporary folder and copied there after each epoch, so a folder and an s3:// prefix work alike
(an S3 object cannot be appended to); `tensorboard --logdir` reads either. A resumed run purges the
steps it redoes, so each epoch shows once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.data import DataContext
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch.utils.tensorboard import SummaryWriter

from raycap import feature_store as fstore
from raycap import storage
from raycap.config import check_bounds, file_only, flag, nested
from raycap.data.splits import COCO2017, SplitRef, TrainingData, check_roles
from raycap.metrics import score_captions
from raycap.models.checkpoint import (
    CaptionModel,
    CheckpointError,
    Resume,
    TrainState,
    load_resume,
    resolve_checkpoint,
    run_checkpoints,
    save_checkpoint,
)
from raycap.models.decoders import DecoderConfig, build_decoder
from raycap.recipe import (
    Plateau,
    TrainConfig,
    TrainPlan,
    build_optimizer,
    caption_steps,
    plan_training,
    train_epoch,
    validate,
)
from raycap.runtime import init_ray, verbose

SHUFFLE_WINDOW = 8  # a worker shuffles the pairs of this many steps' worth of images at a time
TENSORBOARD_DIR = "tensorboard"
# Ray Train metric -> TensorBoard tag, written each epoch.
SCALARS = {
    "train_loss": "train/loss",
    "train_ce": "train/ce",
    "lr": "train/lr",
    "val_ce": "val/loss",
    "bleu1": "val/bleu1",
    "bleu2": "val/bleu2",
    "bleu3": "val/bleu3",
    "bleu4": "val/bleu4",
    "cider_d": "val/cider_d",
}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJobConfig:
    """One training run of one decoder on Ray."""

    features: str = flag("--features", help="extraction output root (folder or s3:// prefix)")
    decoder: DecoderConfig = nested(DecoderConfig)
    train: TrainConfig = nested(TrainConfig)
    num_workers: int = flag("--num-workers", 2, at_least=1, help="Ray Train workers (DDP ranks)")
    use_gpu: bool | None = flag("--use-gpu", None, help="default: if the cluster has GPUs")
    cpus_per_worker: float = flag("--cpus-per-worker", 1.0, above=0)
    captions_per_image: int = flag(
        "--captions-per-image", 5, at_least=1, help="(image, caption) pairs per image and epoch, as in the reference"
    )
    # The split roles (raycap.data.splits); the defaults are COCO 2017's: val2017's even image ids
    # select, its odd ones report. Karpathy: [train, restval], val, test.
    train_splits: tuple[str, ...] = flag(
        "--train-splits", COCO2017[0], help="splits to train on (Karpathy: train restval)"
    )
    select_split: str = flag(
        "--select-split", COCO2017[1], help="split for lr decay, early stopping, best checkpoint"
    )
    report_split: str = flag("--report-split", COCO2017[2], help="split jobs/evaluate.py scores by default")
    storage_path: str = flag(
        "--storage-path", "~/raycap_runs", help="folder or s3:// prefix for runs and checkpoints"
    )
    run_name: str | None = flag(
        "--run-name", None, help="default raycap-<model>; a name in use gets a new run, <name>-2, ..., unless --resume"
    )
    resume: bool = flag("--resume", False, help="continue the run --run-name names from its latest checkpoint")
    max_failures: int = flag("--max-failures", 2, at_least=-1, help="worker failures retried from the last checkpoint")
    keep_checkpoints: int = file_only(2)  # best by BLEU-4; the latest is always kept too

    def __post_init__(self) -> None:
        check_bounds(self)
        check_roles(self.train_splits, self.select_split, self.report_split)

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
def _caption_index(uri_root: str, split: str, per_image: int) -> dict[int, np.ndarray]:
    """image id -> (per_image, L) token ids; images with fewer captions cycle through theirs."""
    captions = fstore.read_captions(uri_root, split)
    order = np.argsort(captions.image_ids, kind="stable")
    ids, tokens = captions.image_ids[order], captions.tokens[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    return {int(ids[s]): tokens[s:e][np.arange(per_image) % (e - s)] for s, e in zip(starts, ends)}


def attach_captions(batch: dict[str, np.ndarray], root: str, split: str, per_image: int) -> dict[str, np.ndarray]:
    """Ray Data batch of image rows of `split` (a split reference) -> the same rows with `captions`
    (B, k, L); images without captions or outside the split's half dropped."""
    ref = SplitRef.parse(split)
    index = _caption_index(root, ref.name, per_image)
    keep = ref.keep(batch["image_id"]) & np.array([int(i) in index for i in batch["image_id"]], dtype=bool)
    ids = batch["image_id"][keep]
    captions = np.stack([index[int(i)] for i in ids]) if len(ids) else np.zeros((0, per_image, 1), np.int32)
    return {"image_id": ids, "features": batch["features"][keep], "captions": captions}


def build_dataset(cfg: TrainJobConfig, splits: tuple[str, ...], shuffle: bool) -> ray.data.Dataset:
    """Image rows of the splits (split references): image_id, features (P, C), captions (k, L)."""
    parts = []
    for split in splits:
        directory = fstore.features_dir(cfg.features, SplitRef.parse(split).name)
        if not fstore.list_shards(directory):
            raise FileNotFoundError(f"no feature shards under {directory}: run jobs/extract_features.py first")
        fs, path = storage.filesystem(directory)
        ds = ray.data.read_parquet(path, filesystem=fs).select_columns(["image_id", "features"])
        parts.append(
            ds.map_batches(
                attach_captions,
                fn_args=(cfg.features, split, cfg.captions_per_image),
                batch_format="numpy",
            )
        )
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.randomize_block_order() if shuffle else ds


def split_images(cfg: TrainJobConfig, split: str) -> tuple[np.ndarray, int]:
    """The image ids (N,) of a split reference's rows that training uses (features and captions, in the
    half), one per row, and the number of their captions."""
    ref = SplitRef.parse(split)
    feature_ids = fstore.split_state(cfg.features, ref.name).feature_ids  # (N,)
    caption_ids = fstore.read_captions(cfg.features, ref.name).image_ids  # (M,)
    ids = feature_ids[np.isin(feature_ids, caption_ids) & ref.keep(feature_ids)]
    if not len(ids):
        raise ValueError(
            f"split {split} has no images with both features and captions under {cfg.features}: "
            "extract it (jobs/extract_features.py --splits ...) or choose another split"
        )
    return ids, int(np.isin(caption_ids, ids).sum())


def plan_run(cfg: TrainJobConfig) -> tuple[TrainPlan, TrainingData]:
    """The step plan from the features' counts, and what the run's checkpoints will record; no Ray needed."""
    fstore.check_root(cfg.features)
    found = [split_images(cfg, split) for split in cfg.train_splits]
    train_ids = np.concatenate([ids for ids, _ in found])  # (N,) one per row: a row in two splits counts twice
    captions = sum(count for _, count in found)
    plan = plan_training(len(train_ids), captions, cfg.captions_per_image, cfg.train, cfg.num_workers)
    select_ids, _ = split_images(cfg, cfg.select_split)
    data = TrainingData(
        cfg.features, cfg.train_splits, cfg.select_split, cfg.report_split, np.unique(train_ids), np.unique(select_ids)
    )
    return plan, data


def plan_lines(cfg: TrainJobConfig, plan: TrainPlan, data: TrainingData) -> list[str]:
    """The plan in words: splits, counts, steps, learning rate, and extracted splits left out."""
    lines = [
        f"train on {'+'.join(cfg.train_splits)}, select on {cfg.select_split} ({len(data.select_ids):,} images: "
        f"lr decay, early stopping, best checkpoint), report on {cfg.report_split} (jobs/evaluate.py's default)",
        *plan.describe(),
    ]
    try:
        extracted = fstore.read_manifest(cfg.features)["splits"]
    except FileNotFoundError:
        extracted = {}
    used = {SplitRef.parse(s).name for s in (*cfg.train_splits, cfg.select_split, cfg.report_split)}
    lines += [f"note: split {name} is extracted but has no role in this run" for name in extracted if name not in used]
    return lines


class ValidationSplit(DataConfig):
    """Training rows split equally (DDP steps in lockstep need it, so up to a row per worker is left out
    each epoch); validation rows split unequally, so every validation image is scored."""

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: list[Any] | None,
        worker_node_ids: list[str] | None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        # Ray Train V2 asks for one dataset at a time.
        others = {name: dataset for name, dataset in datasets.items() if name != "val"}
        shards = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = ray.data.Dataset.copy(datasets["val"])  # as the base class does: leave the caller's untouched
            val.context.execution_options = self.default_ingest_options()
            if val.name is None:
                val.set_name("val")
            parts = val.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for shard, part in zip(shards, parts):
                shard["val"] = part
        return shards


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


def storage_root(cfg: TrainJobConfig) -> str:
    """`storage_path` as an s3:// prefix or an absolute folder (Ray Train needs absolute local paths)."""
    return storage.absolute(cfg.storage_path)


def run_uri(cfg: TrainJobConfig) -> str:
    """The run's folder or s3:// prefix: Ray Train's checkpoints, its snapshot and `tensorboard/`."""
    return storage.join(storage_root(cfg), cfg.name)


def older_checkpoints(checkpoint: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's checkpoints written before `checkpoint`, newest first (Ray Train names them by time)."""
    run_dir, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    found = checkpoint.filesystem.get_file_info(pafs.FileSelector(run_dir))
    names = sorted(
        (f.base_name for f in found if f.type == pafs.FileType.Directory and f.base_name.startswith("checkpoint_")),
        reverse=True,
    )
    return [ray.train.Checkpoint(f"{run_dir}/{n}", filesystem=checkpoint.filesystem) for n in names if n < name]


def restore(latest: ray.train.Checkpoint) -> Resume:
    """Resume state from `latest`, or, if it is damaged, from the newest older checkpoint of the run that loads."""
    for checkpoint in [latest, *older_checkpoints(latest)]:
        try:
            with checkpoint.as_directory() as directory:
                restored = load_resume(directory)
        except CheckpointError as exc:
            logger.warning("[raycap] skipping checkpoint %s, which does not load: %s", checkpoint.path, exc)
            continue
        if checkpoint is not latest:
            logger.warning("[raycap] resuming from %s (epoch %d) instead", checkpoint.path, restored.state.epoch)
        return restored
    raise CheckpointError(
        f"no checkpoint of the run at {latest.path.rstrip('/').rsplit('/', 1)[0]} loads (see the warnings above): "
        "fix or delete the run folder, or train under a new run name"
    )


class Scalars:
    """Per-epoch TensorBoard scalars, written locally and copied to `target` (folder or s3:// prefix) each epoch."""

    def __init__(self, target: str, start_epoch: int) -> None:
        self.target = target
        self.local = tempfile.TemporaryDirectory(prefix="raycap-tensorboard-")
        # purge_step hides the steps an earlier attempt logged from here on: a resume redoes them.
        self.writer = SummaryWriter(self.local.name, purge_step=start_epoch)

    def add(self, metrics: dict[str, Any], epoch: int) -> None:
        for key, tag in SCALARS.items():
            self.writer.add_scalar(tag, float(metrics[key]), epoch)
        self.writer.flush()
        for file in Path(self.local.name).iterdir():
            storage.write_bytes(storage.join(self.target, file.name), file.read_bytes())

    def close(self) -> None:
        self.writer.close()
        self.local.cleanup()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: resume if a checkpoint exists, then train/validate/report each epoch."""
    cfg: TrainJobConfig = config["job"]
    plan: TrainPlan = config["plan"]
    if config["quiet"]:  # Ray Train's INFO lines that its log level misses ("Reporting training result"): files only
        logging.getLogger().setLevel(logging.WARNING)
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    vocab = fstore.read_vocab(cfg.features)
    spec = fstore.stored_spec(cfg.features, SplitRef.parse(cfg.train_splits[0]).name)
    references = fstore.read_references(cfg.features, SplitRef.parse(cfg.select_split).name)
    decoder = build_decoder(cfg.decoder, len(vocab), spec.encoder.feature_dim, spec.encoder.grid)

    start_epoch, plateau, lr = 0, Plateau(tcfg), plan.lr  # lr: after the lr rule and any decay, before warmup
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        restored = restore(checkpoint)
        decoder.load_state_dict(restored.decoder)
        optimizer_state = restored.optimizer
        start_epoch, lr = restored.state.epoch + 1, restored.state.lr
        plateau = Plateau(tcfg, restored.state.best_bleu4, restored.state.since_best)

    model = ray.train.torch.prepare_model(decoder)
    optimizer = build_optimizer(model, lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    device = ray.train.torch.get_device()
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and tcfg.mixed_precision else None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    rank = ray.train.get_context().get_world_rank()
    scalars = Scalars(storage.join(run_uri(cfg), TENSORBOARD_DIR), start_epoch) if rank == 0 else None

    window = SHUFFLE_WINDOW * plan.per_worker  # images
    for epoch in range(start_epoch, tcfg.epochs):
        images = (
            (b["features"], b["captions"])  # (B, P, C), (B, k, L)
            for b in train_shard.iter_torch_batches(batch_size=window, local_shuffle_buffer_size=window)
        )
        seed = int(np.random.SeedSequence([tcfg.seed, epoch, rank]).generate_state(1)[0])  # a resume redraws the same
        steps = caption_steps(images, plan.per_worker, torch.Generator().manual_seed(seed))
        first = epoch * plan.steps_per_epoch  # warmup counts the run's steps
        trained = train_epoch(
            model, steps, optimizer, tcfg, vocab.pad_id, lambda i: lr * plan.warmup_factor(first + i), scaler
        )
        metrics: dict[str, Any] = {"epoch": epoch, **trained}
        if metrics["steps"] != plan.steps_per_epoch:
            logger.warning(
                "[raycap] worker %d took %d steps in epoch %d, the plan said %d",
                rank, metrics["steps"], epoch, plan.steps_per_epoch,
            )  # fmt: skip
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
            lr *= tcfg.lr_decay
        metrics["lr"] = lr
        with tempfile.TemporaryDirectory() as tmp:
            reported = None
            if rank == 0:
                caption_model = CaptionModel(
                    decoder, vocab, spec.encoder, cfg.decoder, epoch,
                    {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                    {"train": dataclasses.asdict(tcfg), "plan": dataclasses.asdict(plan)},
                    config["data"],
                )
                state = TrainState(epoch, lr, plateau.best, plateau.since_best)
                save_checkpoint(tmp, caption_model, optimizer, state)
                (Path(tmp) / "predictions.json").write_text(
                    json.dumps([{"image_id": i, "caption": c} for i, c in sorted(predictions.items())])
                )
                reported = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=reported)
        if scalars is not None:
            scalars.add(metrics, epoch)
            shown = ", ".join(f"{k}={metrics[k]:.3f}" for k in ("train_loss", "val_ce", "bleu4", "cider_d"))
            # sys.stdout, not print: Ray Train patches print() to log each line twice to the driver.
            sys.stdout.write(f"[raycap] {cfg.decoder.kind} epoch {epoch + 1}/{tcfg.epochs}: {shown}, lr={lr:.2e}\n")
            sys.stdout.flush()
        if plateau.should_stop:
            break
    if scalars is not None:
        scalars.close()


def choose_run(cfg: TrainJobConfig) -> tuple[TrainJobConfig, TrainOutcome | None]:
    """The run this job trains: a new one unless `cfg.resume`, so a run name in use moves on to the
    next free `<name>-N`; with `resume`, the named run (started if it does not exist yet). A finished
    run to resume comes back as its outcome, with a line saying so: there is nothing to train."""
    checkpoints = run_checkpoints(run_uri(cfg))
    if not checkpoints:
        return cfg, None
    if not cfg.resume:
        n = 2
        while run_checkpoints(run_uri(new := dataclasses.replace(cfg, run_name=f"{cfg.name}-{n}"))):
            n += 1
        print(f"[raycap] run {run_uri(cfg)} exists: starting a new run, {new.name} (--resume continues the old one)")
        return new, None
    for latest, meta in reversed(checkpoints):  # the newest that loads whole: what the workers resume from
        try:
            state = load_resume(latest).state
            break
        except CheckpointError:
            continue
    else:
        return cfg, None  # the workers' restore then says that no checkpoint loads
    stopped_early = state.since_best >= cfg.train.early_stop_patience
    if state.epoch + 1 < cfg.train.epochs and not stopped_early:
        print(f"[raycap] resuming run {run_uri(cfg)} after epoch {state.epoch + 1} of {cfg.train.epochs}")
        return cfg, None
    best, _ = resolve_checkpoint(run_uri(cfg))
    why = f"stopped early ({state.since_best} epochs without a better BLEU-4)" if stopped_early else "finished"
    print(
        f"[raycap] run {run_uri(cfg)} {why} at epoch {state.epoch + 1}: nothing to train. "
        f"--resume --epochs N (N > {state.epoch + 1}) trains it on; without --resume a new run starts"
    )
    return cfg, TrainOutcome(run_uri(cfg), best, dict(dict(checkpoints)[best].metrics), dict(meta.metrics))


def train(cfg: TrainJobConfig) -> TrainOutcome:
    """Run one new training run, or resume one (`cfg.resume`), on the current Ray cluster; returns
    where results went."""
    cfg = dataclasses.replace(cfg, features=storage.absolute(cfg.features))  # workers run in other folders
    cfg, finished = choose_run(cfg)
    if finished is not None:
        return finished
    print(f"[raycap] training {cfg.decoder.kind} as run {run_uri(cfg)}", flush=True)
    plan, data = plan_run(cfg)
    for line in plan_lines(cfg, plan, data):
        print(f"[raycap] plan: {line}", flush=True)
    init_ray()
    # Its workers' Ray Data progress bars come with the datasets' context: a line per redraw in a log.
    DataContext.get_current().enable_progress_bars = verbose()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    root = storage_root(cfg)
    filesystem, storage_path = storage.filesystem(root) if storage.is_s3(root) else (None, root)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg, "plan": plan, "data": data, "quiet": not verbose()},
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
            logging_config=None if verbose() else ray.LoggingConfig(log_level="WARNING"),  # Train's INFO: log files
        ),
        datasets={
            "train": build_dataset(cfg, cfg.train_splits, shuffle=True),
            "val": build_dataset(cfg, (cfg.select_split,), shuffle=False),
        },
        dataset_config=ValidationSplit(),
    )
    result = trainer.fit()
    best, best_metrics = best_loadable(result.best_checkpoints)
    # Ray reports paths on the storage filesystem (bucket/key for S3): give users URIs they can pass on.
    scheme = "s3://" if storage.is_s3(root) else ""
    best_uri = scheme + best.path if best else None
    return TrainOutcome(scheme + result.path, best_uri, best_metrics, dict(result.metrics or {}))


def best_loadable(
    checkpoints: list[tuple[ray.train.Checkpoint, dict[str, Any]]],
) -> tuple[ray.train.Checkpoint | None, dict[str, Any]]:
    """The checkpoint with the highest BLEU-4 whose every file loads, and its metrics.

    Damaged ones (any file, the optimizer state included: a tampered file is damage too) are skipped with a warning.
    """
    for checkpoint, metrics in sorted(checkpoints, key=lambda pair: pair[1].get("bleu4", -math.inf), reverse=True):
        try:
            with checkpoint.as_directory() as directory:
                load_resume(directory)
        except CheckpointError as exc:
            logger.warning("[raycap] best checkpoint candidate %s does not load, skipped: %s", checkpoint.path, exc)
            continue
        return checkpoint, metrics
    return None, {}


def train_models(configs: list[TrainJobConfig]) -> dict[str, TrainOutcome]:
    """Train each configured decoder in turn, printing its config first and where its results went."""
    outcomes = {}
    for cfg in configs:
        outcome = train(cfg)
        outcomes[cfg.decoder.kind] = outcome
        scores = ", ".join(f"{k}={outcome.best_metrics[k]:.3f}" for k in ("bleu4", "cider_d") if k in outcome.best_metrics)
        print(f"[raycap] {cfg.decoder.kind}: run {outcome.run_dir}; best checkpoint {outcome.best_checkpoint} ({scores})")
    return outcomes
