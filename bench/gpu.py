"""One prepared GPU check: extraction, training and serving on this machine's GPU, each through raycap's
real Ray path, in one Ray session. `bench/gpu.sh` runs it under an 8-minute limit.

With a CUDA GPU, at the reference's sizes:
  1. extraction: `raycap.features.extract_features` (Ray Data reads and decodes JPEGs, an encoder
     actor per GPU runs ResNet-101 at 256x256, Parquet shards are written) of --images generated
     COCO-sized (640x480) JPEGs; images/s per GPU end to end and in steady state (between the first
     and the last published shard, bench/shard_clock.py). Goal: >= 2,000 on one H100-class GPU.
  2. training: `raycap.train.train` (Ray Train, 1 worker on the GPU, mixed precision, Ray Data
     reading the Parquet shards) of the attention decoder at the reference dims, 32 captions per
     step, on random features in raycap's feature-store layout (bench/train.py's store); captions/s
     of the second epoch and the implied time of a COCO epoch (591,753 captions). Goal: < 5 min.
  3. serving: serve_config.yaml deployed with one Encoder and one Decoder replica sharing the GPU
     (num_gpus 0.5 each) and a ResNet-101 + attention checkpoint, under a closed loop of 32 clients
     on loopback (bench/serve.py's); requests/s and latency.
Without a GPU it runs the same code at tiny sizes on CPU (tests/test_bench_gpu.py runs it), so the
script stays honest where no GPU is lent; the goals are not checked there.

Nothing is downloaded: the ResNet-101 has random weights, its first convolution scaled by 2^-15 so
that features stay in float16's range as ImageNet weights keep them (the work is the same).

    bash bench/gpu.sh [--tiny]      # or: python bench/gpu.py [--tiny]

Prints one line per phase, then one JSON line last; "ratio" is the worst of the two goals met
(extraction images/s / 2,000, and 5 min / COCO epoch time): >= 1 when both are met (GPU only).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ray
import ray.cloudpickle
import torch
import torchvision
import train as train_bench
from serve import closed_loop, free_port, photos
from shard_clock import ShardClock
from train import COCO_VOCAB, LOCAL_OBJECT_STORE_BYTES, ray_epoch, rate, time_ray_epochs, write_store

from raycap import feature_store as fstore
from raycap.data.vocab import Vocab
from raycap.features import ExtractConfig, extract_features
from raycap.models.checkpoint import CaptionModel, save_checkpoint
from raycap.models.decoders import DecoderConfig, build_decoder
from raycap.models.encoder_config import EncoderConfig
from raycap.recipe import TrainConfig
from raycap.serve_deploy import deploy, load_config
from raycap.train import TrainJobConfig

REPO = Path(__file__).resolve().parents[1]
COCO_EPOCH_CAPTIONS = 591_753  # captions of COCO 2017 train (Karpathy's train+restval: 566,747)
EXTRACT_GOAL = 2000.0  # images/s per GPU
EPOCH_GOAL_S = 300.0  # a COCO epoch of training
FIRST_CONV_SCALE = 2.0**-15  # random ResNet-101 features in float16's range


@dataclasses.dataclass(frozen=True)
class Sizes:
    """One run's sizes: the reference's on a GPU, tiny on a CPU."""

    images: int  # JPEGs to extract
    image_size: int
    grid: int
    batch: int  # images per encoder call in extraction
    serve_batch: int  # the Serve deployments' max_batch_size
    train_images: int  # 5 captions each
    words: int  # per training caption
    captions_per_step: int
    serve_seconds: float  # measured closed loop at concurrency 32
    max_len: int  # words per served caption (random weights run all of them)


GPU = Sizes(
    images=8000, image_size=256, grid=14, batch=128, serve_batch=32, train_images=2048, words=11,
    captions_per_step=32, serve_seconds=30.0, max_len=20,
)  # fmt: skip
TINY = Sizes(
    images=24, image_size=64, grid=2, batch=8, serve_batch=8, train_images=4, words=4, captions_per_step=4,
    serve_seconds=3.0, max_len=3,
)  # fmt: skip


def write_photos(folder: Path, n: int) -> None:
    """`n` COCO-sized JPEGs (bench/serve.py's `photos`), made on every core."""
    folder.mkdir(parents=True)
    chunks = [range(start, min(n, start + 200)) for start in range(0, n, 200)]
    with ProcessPoolExecutor() as pool:
        for chunk, data in zip(chunks, pool.map(_photos, chunks), strict=True):
            for i, jpeg in zip(chunk, data, strict=True):
                (folder / f"{i:08d}.jpg").write_bytes(jpeg)


def _photos(chunk: range) -> list[bytes]:
    return photos(len(chunk), seed=chunk.start)


def write_weights(path: Path) -> str:
    """A random ResNet-101 state dict whose features stay in float16's range; returns its path."""
    torch.manual_seed(0)
    net = torchvision.models.resnet101(weights=None)
    with torch.no_grad():
        net.conv1.weight.mul_(FIRST_CONV_SCALE)
    torch.save(net.state_dict(), path)
    return str(path)


def extraction(work: Path, sizes: Sizes, encoder: EncoderConfig) -> dict[str, float]:
    """Images/s of `extract_features` over generated JPEGs, end to end and in steady state."""
    write_photos(work / "images", sizes.images)
    out = str(work / "features")
    cfg = ExtractConfig(
        out=out, images=str(work / "images"), encoder=encoder, batch_size=sizes.batch, rows_per_shard=sizes.batch
    )
    with ShardClock(fstore.features_dir(out, "images")) as clock:
        start = time.time()
        summary = extract_features(cfg).splits["images"]
        end = time.time()
    timing = clock.timing(start, end)
    if timing.rows != sizes.images or summary.failed:
        raise RuntimeError(f"extraction wrote {timing.rows} of {sizes.images} images, {summary.failed} failed")
    gpus = max(1, torch.cuda.device_count())
    return {
        "extract_images_per_s_per_gpu": timing.images_per_s / gpus,
        "extract_steady_images_per_s_per_gpu": timing.steady_images_per_s / gpus,
        "extract_startup_s": timing.startup_s,
    }


def training(work: Path, sizes: Sizes, cuda: bool) -> dict[str, float]:
    """Captions/s of the second of 2 Ray Train epochs (1 worker, mixed precision on a GPU)."""
    features = str(work / "train-features")
    write_store(features, sizes.train_images, sizes.words, seed=0)
    tcfg = TrainConfig(epochs=2, captions_per_step=sizes.captions_per_step, max_decode_len=3, mixed_precision=cuda)
    job = TrainJobConfig(
        features=features, train=tcfg, num_workers=1, use_gpu=cuda, cpus_per_worker=1,
        storage_path=str(work / "runs"), run_name="gpu-check", max_failures=0,
    )  # fmt: skip
    captions_per_s = rate(ray_epoch(job))
    return {"train_captions_per_s": captions_per_s, "coco_epoch_s": COCO_EPOCH_CAPTIONS / captions_per_s}


def serving(work: Path, sizes: Sizes, encoder: EncoderConfig, cuda: bool) -> dict[str, float]:
    """Requests/s at concurrency 32 of one Encoder and one Decoder replica sharing the GPU."""
    torch.manual_seed(0)
    vocab = Vocab([f"w{i}" for i in range(COCO_VOCAB - 4)])
    decoder = build_decoder(DecoderConfig(), len(vocab), encoder.feature_dim)
    model = CaptionModel(decoder, vocab, encoder, DecoderConfig())
    checkpoint = str(save_checkpoint(work / "checkpoint", model))
    replica = {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 1,
               "num_gpus": 0.5 if cuda else 0}, "user_config": {"max_batch_size": sizes.serve_batch}}  # fmt: skip
    deployments = {"Encoder": replica, "Decoder": {**replica, "user_config": {**replica["user_config"],
                   "max_decode_len": sizes.max_len}}}  # fmt: skip
    overrides = {"deployments": deployments, "logging_config": {"enable_access_log": False}}
    config = load_config(REPO / "serve_config.yaml", checkpoint=checkpoint, port=free_port(), overrides=overrides)
    url = deploy(config) + "/caption"
    images = photos(8)
    asyncio.run(closed_loop(url, images, 32, min(5.0, sizes.serve_seconds), 10_000))  # warm-up
    r = asyncio.run(closed_loop(url, images, 32, sizes.serve_seconds, 100_000))
    if r["failures"] or not r["requests"]:
        raise RuntimeError(f"serving: {r['failures']} failed requests of {r['requests'] + r['failures']}")
    return {"serve_rps_c32": r["rps"], "serve_p50_ms": r["p50_ms"], "serve_p99_ms": r["p99_ms"]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes even with a GPU (default without one)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    sizes = TINY if args.tiny or not cuda else GPU
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"device {device} x {torch.cuda.device_count()}; sizes {sizes}", flush=True)
    figures: dict[str, object] = {"device": device, "gpus": torch.cuda.device_count(), "sizes": dataclasses.asdict(sizes)}
    with tempfile.TemporaryDirectory(prefix="raycap-gpu-check-") as tmp:
        work = Path(tmp)
        weights = write_weights(work / "resnet101.pt")
        encoder = EncoderConfig("resnet101", weights, grid=sizes.grid, image_size=sizes.image_size)
        cpus = os.cpu_count() or 1
        ray.cloudpickle.register_pickle_by_value(train_bench)  # workers cannot import bench/ modules
        ray.init(num_cpus=max(4, cpus + 2), object_store_memory=None if cuda else LOCAL_OBJECT_STORE_BYTES,
                 runtime_env={"worker_process_setup_hook": time_ray_epochs})  # fmt: skip
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for name, phase in (
                ("extraction", functools.partial(extraction, work, sizes, encoder)),
                ("training", functools.partial(training, work, sizes, cuda)),
                ("serving", functools.partial(serving, work, sizes, encoder, cuda)),
            ):
                start = time.monotonic()
                result = phase()
                figures.update({key: round(value, 2) for key, value in result.items()})
                shown = ", ".join(f"{key} {value:.2f}" for key, value in result.items())
                print(f"{name} ({time.monotonic() - start:.0f} s): {shown}", flush=True)
        finally:
            ray.shutdown()
    met = min(figures["extract_images_per_s_per_gpu"] / EXTRACT_GOAL, EPOCH_GOAL_S / figures["coco_epoch_s"])
    figures |= {"goals_apply": sizes == GPU, "ratio": round(met, 3)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
