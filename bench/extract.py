"""Feature extraction throughput: the Ray Data pipeline vs a plain single-process PyTorch loop.

Both decode the same images with `load_image`, encode them with the same `Encoder` at the same batch
size and torch thread count, and write the same float16 Parquet shards; the loop uses a torch
DataLoader with 2 workers. What each side's clock covers, for a fair comparison:
  - both build the encoder (weights included) inside the timing, and encode their first batch with
    a cold model: the loop runs in a fresh process each time, as Ray's encoder actor does;
  - neither includes starting Python and importing torch and raycap for the loop (done before its
    timer), nor starting Ray (before timing: a cluster is long-lived); Ray's encoder actor, a fresh
    worker process, imports torch and Ray Data inside the timing: a cost only Ray pays.
Each run's shards are timed as they are published (bench/shard_clock.py, the same clock for both
sides): start-up is the time to the first shard (the first encoded batch, written), steady state
the images per second from the first shard to the last. The two alternate `--repeats` times and the
best figure of each side counts, which damps noisy neighbours on small shared machines.

Both store the trunk's native grid. Untimed, the loop also stores the same images pooled to
`--grid` (how raycap stored features before: for ResNet-101 at 256, 14x14 upsampled from 8x8), so
the bytes per image of both layouts come from one run.

    python bench/extract.py [--images 300 --arch efficientnet_lite0 --weights imagenet --size 224 --grid 7]
    python bench/extract.py --images 32 --arch resnet101 --size 256 --grid 14 --repeats 1 --weights FILE

(FILE: ResNet-101 weights. Random ones overflow float16 unless scaled: README, Benchmarks.)

Prints a table, then one JSON line last; "ratio" is ray_images_per_s / loop_images_per_s, end to end,
"steady_ratio" the same in steady state; "bytes_per_image" is Parquet per image at the native grid,
"pooled_bytes_per_image" the same images stored at --grid.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace

import numpy as np
import ray
import torch
from torch.utils.data import DataLoader, Dataset

from raycap import feature_store as fstore
from raycap import storage
from raycap.data.coco import ImageRecord
from raycap.data.images import load_image
from raycap.data.synthetic import generate
from raycap.feature_store import FeatureSpec
from raycap.features import ExtractConfig, SplitSummary, extract_features, list_image_records
from raycap.models.encoder import Encoder, pool_to_grid
from raycap.models.encoder_config import EncoderConfig
from shard_clock import ShardClock, Timing

# Decoded images are read-only; set here, so the loop's fresh processes ignore it too.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class _Images(Dataset):
    def __init__(self, records: list[ImageRecord], size: int) -> None:
        self.records, self.size = records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int, int]:
        image, decoded = load_image(storage.read_bytes(self.records[i].path), self.size)
        return image, i, decoded.width, decoded.height


def run_loop(
    records: list[ImageRecord], spec: FeatureSpec, out: str, batch_size: int, rows_per_shard: int, torch_threads: int
) -> tuple[float, float]:
    """The single-process baseline, storing features at `spec.stored_grid`; returns its start and end
    (epoch seconds, for the shard clock of another process)."""
    torch.set_num_threads(torch_threads)
    start = time.time()
    encoder = Encoder(spec.encoder)
    loader = DataLoader(_Images(records, spec.encoder.image_size), batch_size=batch_size, num_workers=2)
    buffer: list[tuple[np.ndarray, ...]] = []
    shard = 0

    def flush() -> None:
        nonlocal shard
        index, widths, heights, features = (np.concatenate(column) for column in zip(*buffer))
        table = fstore.features_table(
            spec,
            np.array([records[i].image_id for i in index]),
            [records[i].path for i in index],
            widths,
            heights,
            [None] * len(index),
            features,
        )
        fstore.write_table(table, storage.join(out, f"part-{shard:05d}.parquet"))
        buffer.clear()
        shard += 1

    for images, index, widths, heights in loader:
        features = pool_to_grid(encoder.encode(images), spec.stored_grid).half().numpy()  # (B, P, C)
        buffer.append((index.numpy(), widths.numpy(), heights.numpy(), features))
        if sum(len(b[0]) for b in buffer) >= rows_per_shard:
            flush()
    if buffer:
        flush()
    return start, time.time()


def timed_loop(args: argparse.Namespace, records: list[ImageRecord], spec: FeatureSpec, out: str) -> Timing:
    """`run_loop` in a fresh process, its shards timed from this one."""
    spawn = multiprocessing.get_context("spawn")  # not fork: no model, caches or Ray threads carried over
    with ShardClock(out) as clock, ProcessPoolExecutor(1, mp_context=spawn) as pool:
        job = pool.submit(run_loop, records, spec, out, args.batch_size, args.rows_per_shard, args.torch_threads)
        start, end = job.result()
    return clock.timing(start, end)


def parquet_bytes(directory: str) -> int:
    return sum(info.size for info in storage.list_files(directory, [".parquet"]))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=32)
    # A shard per batch, so the shard clock sees every batch (raycap's default is 128 rows).
    parser.add_argument("--rows-per-shard", type=int, default=32)
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="logical CPUs of the local Ray")
    parser.add_argument("--encoders", type=int, default=1, help="encoder actors in the Ray pool")
    parser.add_argument("--encoder-cpus", type=float, default=1.0)
    parser.add_argument("--decode-cpus", type=float, default=0.5)
    parser.add_argument("--decode-batch-size", type=int, default=16)
    # One intra-op thread was fastest on the 2-core CI machine (2 threads ran 1.5-3x slower).
    parser.add_argument("--torch-threads", type=int, default=1, help="for the loop and each encoder actor")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    spec = FeatureSpec(EncoderConfig(args.arch, args.weights, args.grid, args.size))
    work = tempfile.mkdtemp(prefix="raycap-bench-")
    try:
        generate(os.path.join(work, "coco"), n_train=args.images, n_val=0)
        image_dir = os.path.join(work, "coco", "train2017")
        records = list_image_records(image_dir, "images")
        print(f"{len(records)} synthetic images, encoder {spec.encoder}, {os.cpu_count()} cores", flush=True)

        # Ray runs its workers at nice 15; beside other work on a shared machine that alone starves the
        # pipeline, so give them the loop's priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=args.ray_cpus, object_store_memory=1 << 30, include_dashboard=False)
        runs: dict[str, list[Timing]] = {"loop": [], "ray": []}
        for repeat in range(args.repeats):
            loop_out = os.path.join(work, f"loop{repeat}")
            runs["loop"].append(timed_loop(args, records, spec, loop_out))
            _print_run("loop", runs["loop"][-1])
            ray_out = os.path.join(work, f"ray{repeat}")
            summary, timing = timed_ray(args, image_dir, spec, ray_out)
            assert summary.ok == timing.rows == len(records), summary
            runs["ray"].append(timing)
            _print_run("ray", timing)
        ray.shutdown()
        best = {side: _best(timings) for side, timings in runs.items()}
        print(f"\nbest of {args.repeats} ({os.getloadavg()[0]:.1f} load average): start-up s, steady images/s, "
              "end to end s and images/s", flush=True)  # fmt: skip
        for side, (startup, steady, elapsed) in best.items():
            print(f"  {side:<4} {startup:6.1f} {steady:8.1f} {elapsed:8.1f} {len(records) / elapsed:8.1f}", flush=True)
        loop_bpi = parquet_bytes(loop_out) / len(records)
        print(f"Parquet bytes per image: ray {summary.bytes_per_image:.0f}, loop {loop_bpi:.0f}", flush=True)
        pooled = replace(spec, stored_grid=spec.encoder.grid)
        pooled_out = os.path.join(work, "pooled")
        if pooled != spec:
            run_loop(records, pooled, pooled_out, args.batch_size, args.rows_per_shard, args.torch_threads)
        pooled_bpi = parquet_bytes(pooled_out) / len(records) if pooled != spec else summary.bytes_per_image
        print(f"stored at the native grid: {spec.describe()}; {summary.bytes_per_image:.0f} bytes/image", flush=True)
        print(f"stored at --grid: {pooled.describe()}; {pooled_bpi:.0f} bytes/image", flush=True)
        figures = {
            "images": len(records),
            "encoder": asdict(spec.encoder),
            "feature_shape": list(spec.shape),
            "pooled_shape": list(pooled.shape),
            "dtype": spec.dtype,
            "batch_size": args.batch_size,
            "torch_threads": args.torch_threads,
            "ray_encoders": args.encoders,
            "cores": os.cpu_count(),
            "load_average": round(os.getloadavg()[0], 1),
            "loop_startup_s": round(best["loop"][0], 2),
            "ray_startup_s": round(best["ray"][0], 2),
            "loop_steady_images_per_s": round(best["loop"][1], 2),
            "ray_steady_images_per_s": round(best["ray"][1], 2),
            "steady_ratio": round(best["ray"][1] / best["loop"][1], 3),
            "loop_images_per_s": round(len(records) / best["loop"][2], 2),
            "ray_images_per_s": round(len(records) / best["ray"][2], 2),
            "ratio": round(best["loop"][2] / best["ray"][2], 3),
            "bytes_per_image": round(summary.bytes_per_image, 1),
            "pooled_bytes_per_image": round(pooled_bpi, 1),
            "pooled_over_native_bytes": round(pooled_bpi / summary.bytes_per_image, 3),
        }
        print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print_run(side: str, t: Timing) -> None:
    print(f"{side}: {t.images_per_s:.1f} images/s end to end ({t.elapsed_s:.1f} s), start-up {t.startup_s:.1f} s, "
          f"steady {t.steady_images_per_s:.1f} images/s", flush=True)  # fmt: skip


def _best(timings: list[Timing]) -> tuple[float, float, float]:
    """The best start-up, steady state and end to end over the repeats (each may come from another run)."""
    return (
        min(t.startup_s for t in timings),
        max(t.steady_images_per_s for t in timings),
        min(t.elapsed_s for t in timings),
    )


def timed_ray(args: argparse.Namespace, image_dir: str, spec: FeatureSpec, out: str) -> tuple[SplitSummary, Timing]:
    """The Ray Data pipeline on the running cluster, its shards timed; returns its summary and timing."""
    cfg = ExtractConfig(
        out=out,
        images=image_dir,
        encoder=spec.encoder,
        batch_size=args.batch_size,
        num_encoders=args.encoders,
        encoder_cpus=args.encoder_cpus,
        torch_threads=args.torch_threads,
        decode_batch_size=args.decode_batch_size,
        decode_cpus=args.decode_cpus,
        rows_per_shard=args.rows_per_shard,
    )
    with ShardClock(fstore.features_dir(out, "images")) as clock:
        start = time.time()
        result = extract_features(cfg)
        end = time.time()
    return result.splits["images"], clock.timing(start, end)


if __name__ == "__main__":
    main()
