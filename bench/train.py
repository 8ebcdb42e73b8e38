"""Ray Train with one worker against a plain PyTorch loop: same Parquet features, model and steps, one run.

Data: random features written as real Parquet shards in raycap's feature-store layout (features/,
captions/, vocab.json): `--images` training images of ResNet-101 features (2048 channels, on the
grid raycap stores, which the decoder pools to 14x14), 5 captions each of exactly `--words` random
words (COCO captions average ~10.5), a COCO-sized vocabulary of 9,490 entries, and a 2-image val
split to select on. Model: the reference attention decoder (embed/decoder/attention 512). On a
2-core machine a step of 32 captions takes a fraction of a second, hence the small default epoch
(64 images: 10 steps); with fewer, Ray Data's wait for the first step weighs more than in any real
epoch.

Ray Train side: `raycap.train.train`, the real TorchTrainer path with Ray Data reading the shards,
for 2 epochs: epoch 0 warms up (worker start, first read), epoch 1 counts. Ray Train reports no
epoch time, so a worker-process setup hook wraps raycap.train's `train_epoch` (`timed`) to add its
seconds, captions, wait for the first step and torch threads to the epoch's metrics.
Plain side: the same shards read with pyarrow (`raycap.feature_store`, `attach_captions`) into
tensors, cut into the same steps by `recipe.caption_steps` and trained by `recipe.train_epoch`
(timed alike): a warm-up epoch, then `--repeats` rounds of a plain epoch and a Ray 1-worker run
(which goes first flips each round). The headline is the median of the rounds' ratios: a round's
two sides run back to back, so a machine whose speed drifts (this one's matmul rate fell 28% within
one run) moves both; each side's fastest epoch is reported too, and the GEMM share uses the
machine's fastest matmul rate, measured before and after. Both sides use --threads torch threads
(the Ray worker gets them as its CPUs). Then, for information,
Ray Train with 2 workers of 1 CPU each.

captions/s counts whole epochs, the wait for the first step included: Ray Data reads a window of
images before it, which a real epoch (113k images) overlaps with training, so the figure is
conservative; the ratio without that wait is printed too.

Distance to the limit (bench/flops.py): training FLOPs per step (forward and backward matmuls,
from the layer shapes; checked against torch's own count on a first plain step) at the measured
captions/s, as a share of this machine's matmul rate at the same shapes and threads, measured in
the same run; also per CPU second of the training processes (the Ray workers' own: Ray Data's
reads run in other processes). `--profile` prints torch.profiler's top ops of two plain-loop steps.

    python bench/train.py [--images 64 --words 11 --captions-per-step 32 --threads 2 --repeats 3] [--quick] [--profile]

Prints a table, then one JSON line last; "ratio" is the median over rounds of Ray Train (1 worker)
/ plain loop captions/s ("best_epochs_ratio": the two sides' fastest epochs).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from flops import Matmul, counted_flops, decoder_matmuls, pass_flops, profile_table, reference

from raycap import feature_store as fstore
from raycap import storage
from raycap.data.vocab import Vocab
from raycap.feature_store import FeatureSpec
from raycap.models.decoders import build_decoder
from raycap.models.encoder_config import EncoderConfig
from raycap.recipe import Batch, TrainConfig, build_optimizer, caption_steps, train_epoch
from raycap.runtime import LOCAL_OBJECT_STORE_BYTES
from raycap.train import SHUFFLE_WINDOW, TrainJobConfig, attach_captions, plan_run, train

COCO_VOCAB = 9490  # entries in the reference's COCO word map, specials included
CAPTIONS_PER_IMAGE = 5
SPEC = FeatureSpec(EncoderConfig("resnet101", "none"))  # stored as extraction stores ResNet-101 at 256 px
VAL_IDS = [1_000_000, 1_000_001]  # val:even selects on the first, val:odd is left to report
Metrics = dict[str, Any]


def write_store(out: str, images: int, words: int, seed: int) -> None:
    """Random features and captions of `images` training images and the val split, in raycap's layout."""
    rng = np.random.default_rng(seed)
    vocab = Vocab([f"w{i}" for i in range(COCO_VOCAB - 4)])
    storage.write_bytes(storage.join(out, fstore.VOCAB_FILE), vocab.to_json().encode("utf-8"))
    for split, ids in (("train", list(range(images))), ("val", VAL_IDS)):
        for start in range(0, len(ids), 8):  # shards of 8 images
            part = np.array(ids[start : start + 8], np.int64)
            features = rng.random((len(part), *SPEC.shape), np.float32)  # (n, P, C), post-ReLU-like
            sizes = np.full(len(part), 640, np.int32), np.full(len(part), 480, np.int32)
            keys = [f"synthetic/{i}.jpg" for i in part]
            table = fstore.features_table(SPEC, part, keys, *sizes, [None] * len(part), features)
            fstore.write_table(table, storage.join(fstore.features_dir(out, split), f"part-{start:05d}.parquet"))
        caption_ids = [i for i in ids for _ in range(CAPTIONS_PER_IMAGE)]
        texts = [" ".join(rng.choice(vocab.itos[4:], words)) for _ in caption_ids]
        fstore.write_table(fstore.captions_table(caption_ids, texts, vocab), fstore.captions_uri(out, split))


def timed(epoch_fn: Callable[..., Metrics]) -> Callable[..., Metrics]:
    """`train_epoch` whose metrics also give its wall and process CPU seconds, the wait for its first
    step, its captions and torch's threads."""

    @functools.wraps(epoch_fn)
    def run(model: torch.nn.Module, steps: Iterable[Batch], *args: Any, **kwargs: Any) -> Metrics:
        clock: Metrics = {"epoch_captions": 0}

        def counted() -> Iterator[Batch]:
            for features, captions in steps:
                clock.setdefault("first_step_s", time.perf_counter() - start)
                clock["epoch_captions"] += len(captions)
                yield features, captions

        start, start_cpu = time.perf_counter(), time.process_time()
        metrics = epoch_fn(model, counted(), *args, **kwargs)
        seconds = {"epoch_s": time.perf_counter() - start, "epoch_cpu_s": time.process_time() - start_cpu}
        return {**metrics, **clock, **seconds, "torch_threads": torch.get_num_threads()}

    return run


def time_ray_epochs() -> None:
    """Ray worker-process setup hook: raycap.train's epochs report `timed`'s figures. Importing torch
    here loads OpenMP before Ray sets OMP_NUM_THREADS to the worker's CPUs (when its first task
    starts), so each epoch applies that setting, as torch imported by the worker itself would."""
    import raycap.train

    epoch_fn = timed(raycap.train.train_epoch)

    def run(*args: Any, **kwargs: Any) -> Metrics:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        return epoch_fn(*args, **kwargs)

    raycap.train.train_epoch = run


class PlainLoop:
    """The baseline: the training split read into memory, one process, raycap.recipe's steps and epoch."""

    def __init__(self, job: TrainJobConfig) -> None:
        self.job = job
        self.plan, _ = plan_run(job)  # as raycap.train.train plans the run
        vocab, spec = fstore.read_vocab(job.features), fstore.stored_spec(job.features, "train")
        ids, features = fstore.read_features(job.features, "train")  # (N,), (N, P, C) float16
        batch = {"image_id": ids, "features": features}
        rows = attach_captions(batch, job.features, "train", job.captions_per_image)
        self.features = torch.from_numpy(rows["features"])  # (N, P, C)
        self.captions = torch.from_numpy(rows["captions"])  # (N, k, L)
        self.pad_id = vocab.pad_id
        torch.manual_seed(job.train.seed)
        self.model = build_decoder(job.decoder, len(vocab), spec.encoder.feature_dim, spec.encoder.grid)
        self.optimizer = build_optimizer(self.model, self.plan.lr)
        self.generator = torch.Generator().manual_seed(job.train.seed)

    def steps(self) -> Iterator[Batch]:
        """One epoch's steps, as a Ray Train worker cuts them: windows of images, pairs shuffled in each."""
        order = torch.randperm(len(self.features), generator=self.generator)
        window = SHUFFLE_WINDOW * self.plan.per_worker
        images = ((self.features[i], self.captions[i]) for i in order.split(window))  # (B, P, C), (B, k, L)
        return caption_steps(images, self.plan.per_worker, self.generator)

    def epoch(self, steps: Iterable[Batch] | None = None) -> Metrics:
        """`timed` metrics of one epoch of `steps` (default: a fresh epoch)."""
        steps = self.steps() if steps is None else steps
        return timed(train_epoch)(self.model, steps, self.optimizer, self.job.train, self.pad_id, self.lr_at)

    def lr_at(self, step: int) -> float:
        return self.plan.lr  # a step's learning rate does not change its cost


def ray_epoch(job: TrainJobConfig) -> Metrics:
    """Train `job` with Ray Train; the metrics of its last epoch, captions summed over workers."""
    metrics = train(job).last_metrics
    if metrics.get("epoch") != job.train.epochs - 1 or "epoch_s" not in metrics:
        raise RuntimeError(f"Ray Train's last metrics are not a timed epoch {job.train.epochs - 1}: {metrics}")
    # Rank 0 reports; the equal split gives every worker the same captions, and about the same CPU time.
    summed = {key: metrics[key] * job.num_workers for key in ("epoch_captions", "epoch_cpu_s")}
    return {**metrics, **summed}


def rate(metrics: Metrics, wait: bool = True) -> float:
    """Captions/s of an epoch, with or without the wait for its first step."""
    return metrics["epoch_captions"] / (metrics["epoch_s"] - (0.0 if wait else metrics["first_step_s"]))


def cpu_rate(metrics: Metrics) -> float:
    """Captions per CPU second of the training processes (Ray Data's run in others)."""
    return metrics["epoch_captions"] / metrics["epoch_cpu_s"]


def step_matmuls(plain: PlainLoop, job: TrainJobConfig, words: int) -> tuple[list[Matmul], int]:
    """Warm the plain loop up with one step, under torch's FLOP counter; the matmuls of a step and its
    captions, once bench/flops.py's count matches torch's."""
    warm = next(plain.steps())  # features (n, P, C), captions (n, L)
    counted = counted_flops(lambda: plain.epoch([warm]))
    images, rows = len(warm[0]), len(warm[1])
    grid, channels = SPEC.encoder.grid, SPEC.encoder.feature_dim
    # Each word is predicted, then <end>.
    matmuls = decoder_matmuls(job.decoder, COCO_VOCAB, grid * grid, channels, images, rows // images, words + 1)
    if counted != pass_flops(matmuls, training=True):
        raise RuntimeError(
            f"torch counts {counted:.6g} FLOPs in a training step, bench/flops.py "
            f"{pass_flops(matmuls, training=True):.6g}: update decoder_matmuls to the decoder"
        )
    return matmuls, rows


def measure(plain: PlainLoop, job: TrainJobConfig, repeats: int, scaling: bool) -> dict[str, list[Metrics]]:
    """Epoch metrics of each side: `repeats` rounds of a plain epoch and a Ray Train 1-worker run, in
    alternating order, then (for scaling) a Ray Train 2-worker run."""
    plain.epoch()  # warm-up, as Ray Train's epoch 0
    sides: dict[str, list[Metrics]] = {"plain loop": [], "Ray Train, 1 worker": []}
    # As raycap.runtime.init_ray starts a local Ray, plus the hook that times the workers' epochs. With
    # its dashboard: without the state API behind it, each Train run's placement group cleaner never
    # sees its controller end and polls for the rest of the bench, slowing every later epoch.
    cpus = max(4, (os.cpu_count() or 1) + 2)
    runtime_env = {"worker_process_setup_hook": time_ray_epochs}
    ray.init(num_cpus=cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES, runtime_env=runtime_env)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for repeat in range(repeats):
            order = ["plain loop", "Ray Train, 1 worker"]  # flipped each round: a drifting machine favours neither
            for side in order if repeat % 2 == 0 else order[::-1]:
                ray_job = dataclasses.replace(job, run_name=f"bench-1-worker-{repeat}")
                sides[side].append(plain.epoch() if side == "plain loop" else ray_epoch(ray_job))
        if scaling:
            two = dataclasses.replace(job, num_workers=2, cpus_per_worker=1, run_name="bench-2-workers")
            sides["Ray Train, 2 workers"] = [ray_epoch(two)]
    finally:
        ray.shutdown()
    return sides


def best(epochs: list[Metrics]) -> Metrics:
    """The fastest epoch: the one least disturbed by neighbours on a shared machine."""
    return max(epochs, key=rate)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="training images (5 captions each)")
    parser.add_argument("--words", type=int, default=11, help="words per caption")
    parser.add_argument("--captions-per-step", type=int, default=TrainConfig.captions_per_step)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (plain epoch, Ray Train run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-scaling", action="store_true", help="skip the 2-worker run")
    parser.add_argument("--profile", action="store_true", help="print the top ops of two plain-loop steps")
    parser.add_argument("--quick", action="store_true", help="8 images, 4 words, 8 captions per step, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.words, args.captions_per_step, args.repeats = 8, 4, 8, 1

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="raycap-bench-train-"))
    try:
        out = str(work / "features")
        write_store(out, args.images, args.words, args.seed)
        tcfg = TrainConfig(
            epochs=2, captions_per_step=args.captions_per_step, max_decode_len=3, mixed_precision=False, seed=args.seed
        )
        job = TrainJobConfig(
            features=out, train=tcfg, num_workers=1, use_gpu=False, cpus_per_worker=args.threads,
            storage_path=str(work / "runs"), run_name="bench-1-worker", max_failures=0,
        )  # fmt: skip
        plain = PlainLoop(job)
        print(
            f"{args.images} images x {CAPTIONS_PER_IMAGE} captions of {args.words} words, features "
            f"{SPEC.describe()}, vocab {COCO_VOCAB}, {args.captions_per_step} captions per step, "
            f"{args.threads} torch threads, {args.repeats} alternating rounds; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        matmuls, rows = step_matmuls(plain, job, args.words)
        refs = [reference(matmuls, training=True, device=torch.device("cpu"))]
        sides = measure(plain, job, args.repeats, scaling=not args.no_scaling)
        refs.append(reference(matmuls, training=True, device=torch.device("cpu")))
        ref = max(refs, key=lambda r: r.rate)  # the machine's rate, measured like the sides: at its least disturbed
        caption_flops = ref.flops / rows

        print(f"{'side':<22} {'threads':>7} {'epoch s':>8} {'wait s':>7} {'captions':>8} {'captions/s':>10} "
              f"{'w/o wait':>9} {'GFLOP/s':>8} {'share':>6} {'share (CPU)':>12}")  # fmt: skip
        for name, epochs in sides.items():
            for m in epochs:
                row = f"{name:<22} {m['torch_threads']:>7} {m['epoch_s']:>8.1f} {m['first_step_s']:>7.2f}"
                useful = rate(m) * caption_flops
                row = f"{row} {m['epoch_captions']:>8} {rate(m):>10.2f} {rate(m, wait=False):>9.2f} {useful / 1e9:>8.2f}"
                share_cpu = ref.share(cpu_rate(m) / rows, per_cpu_s=True)
                print(f"{row} {useful / ref.rate:>6.1%} {share_cpu:>12.1%}", flush=True)
        plain_best, ray_1 = best(sides["plain loop"]), best(sides["Ray Train, 1 worker"])
        rounds = list(zip(sides["plain loop"], sides["Ray Train, 1 worker"], strict=True))  # (plain, Ray) per round
        figures: Metrics = {
            "images": args.images,
            "captions_per_epoch": plain.plan.images_per_worker * CAPTIONS_PER_IMAGE,
            "words": args.words,
            "captions_per_step": args.captions_per_step,
            "stored_feature_shape": list(SPEC.shape),
            "decoder_grid": SPEC.encoder.grid,
            "vocab": COCO_VOCAB,
            "threads": args.threads,
            "repeats": args.repeats,
            "ray_torch_threads": ray_1["torch_threads"],
            "plain_captions_per_s": round(rate(plain_best), 3),
            "plain_epochs_captions_per_s": [round(rate(m), 3) for m in sides["plain loop"]],
            "ray_captions_per_s": round(rate(ray_1), 3),
            "ray_runs_captions_per_s": [round(rate(m), 3) for m in sides["Ray Train, 1 worker"]],
            "ray_first_step_wait_s": round(ray_1["first_step_s"], 2),
            "round_ratios": [round(rate(r) / rate(p), 3) for p, r in rounds],
            "ratio_without_wait": round(
                statistics.median(rate(r, wait=False) / rate(p, wait=False) for p, r in rounds), 3
            ),
            "best_epochs_ratio": round(rate(ray_1) / rate(plain_best), 3),
            "train_gflop_per_caption": round(caption_flops / 1e9, 3),
            "gemm_gflops": round(ref.rate / 1e9, 2),
            "gemm_gflops_measured": [round(r.rate / 1e9, 2) for r in refs],
            "plain_gemm_share": round(rate(plain_best) * caption_flops / ref.rate, 3),
            "ray_gemm_share": round(rate(ray_1) * caption_flops / ref.rate, 3),
            "plain_gemm_share_cpu": round(cpu_rate(plain_best) * caption_flops / ref.cpu_rate, 3),
            "ray_gemm_share_cpu": round(cpu_rate(ray_1) * caption_flops / ref.cpu_rate, 3),
            "load_average": round(os.getloadavg()[0], 1),
        }
        if "Ray Train, 2 workers" in sides:
            two = sides["Ray Train, 2 workers"][0]
            figures["ray_2_workers_captions_per_s"] = round(rate(two), 3)
            figures["scaling_2_workers"] = round(rate(two) / rate(ray_1), 3)
        figures["ratio"] = round(statistics.median(rate(r) / rate(p) for p, r in rounds), 3)
        print(f"\nRay Train 1 worker / plain loop, median of {len(rounds)} rounds: {figures['ratio']:.3f}x "
              f"(rounds {figures['round_ratios']}; {figures['ratio_without_wait']:.3f}x without the wait for the "
              f"first step; best epochs {figures['best_epochs_ratio']:.3f}x)")  # fmt: skip
        if "scaling_2_workers" in figures:
            print(f"2 workers x 1 thread / 1 worker x {args.threads} threads: {figures['scaling_2_workers']:.3f}x")
        print(f"\nmatmuls of one training step ({rows} captions, forward and backward), measured alone:")
        print(ref.table())
        if args.profile:
            print(f"\nprofile: two plain-loop steps of {rows} captions", flush=True)
            two_steps = [next(plain.steps()), next(plain.steps())]
            print(profile_table(lambda: plain.epoch(two_steps), torch.device("cpu")), flush=True)
        print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
