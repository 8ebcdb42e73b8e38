"""Serving over loopback HTTP: dynamic batching against batch size 1 at concurrency 1, 8 and 32,
then the Decoder's autoscaling under sustained load and after idle.

The application is the repo's serve_config.yaml on a local Ray, with a random-weight checkpoint
made here: the reference's decoder (attention, embed/decoder/attention 512, a COCO-sized
vocabulary of 9,490 entries) over a 14x14 grid of ResNet-18 features at 224x224 (512 channels
rather than ResNet-101's 2048, which would leave a CPU encoder-bound). Random weights almost never
pick <end>, so every caption runs all --max-len words: fixed work per image.

Throughput phases pin one Encoder and one Decoder replica, so batching is the only difference;
the two modes differ only in the deployments' user_config max_batch_size (1 against the
config's), switched by reconfigure on the same replicas, alternating per concurrency level. Each
level is a closed loop of N clients for --seconds after a warm-up, every loop bounded in requests
and time. The autoscaling phase restores the config's autoscaling_config, holds --sustain-s of load
at the highest concurrency, then goes idle until the Decoder is back to min_replicas (at most
--idle-s), sampling replica counts each second.

    python bench/serve.py [--seconds 15 --sustain-s 60 --idle-s 90] [--checkpoint DIR] [--quick] [--models]

--models adds a multiplexing phase (Serve model multiplexing, raycap.serve): the application serving
two random checkpoints of the same shape on one trunk, pinned and batched, at the highest
concurrency, first every request to one model, then requests alternating between the two. The
Decoder batches per model, so alternating halves its batches: the figure is what serving two
models at once costs against one.

Distance to the limit (bench/flops.py): requests/s at the highest concurrency, batched, times the
useful FLOPs of a request (torch's count of the encoder's convolutions and the decoder's beam
search on the bench's own images), as a share of this machine's matmul rate at the same shapes
(the encoder's convolutions as matmuls and the decoder's, at the deployments' batch size) with the
torch threads of all its cores, measured in the same run. `--profile` prints where the rest goes:
torch.profiler's top ops of one Encoder batch and one Decoder batch, on 1 thread as a replica.

Prints a table and the replica timeline, then one JSON line last; "ratio" is batched/unbatched
requests/s at the highest concurrency (32); "gemm_share" the distance to the limit there;
"multiplexed" (with --models) the one-model and two-alternating rows, "two_over_one" their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import io
import itertools
import json
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import numpy as np
import ray
import torch
from PIL import Image
from ray import serve
from ray.serve.schema import ServeDeploySchema
from flops import Reference, counted_flops, decoder_matmuls, module_matmuls, profile_table, reference

from raycap.data.vocab import Vocab
from raycap.models.beam import beam_search
from raycap.models.checkpoint import CaptionModel, load_checkpoint, save_checkpoint
from raycap.models.decoders import DecoderConfig, build_decoder
from raycap.models.decoding import BEAM_SIZE
from raycap.models.encoder import Encoder
from raycap.models.encoder_config import EncoderConfig
from raycap.serve_deploy import deploy, load_config, replica_counts
from raycap.serve_schema import APP_NAME

REPO = Path(__file__).resolve().parents[1]
COCO_VOCAB = 9490  # entries in the reference's COCO word map, specials included
PINNED = {"num_replicas": 1, "autoscaling_config": None}


def make_checkpoint(directory: Path, seed: int = 0) -> str:
    """A random-weight checkpoint: reference decoder over ResNet-18 features (14x14x512 at 224x224);
    seeds differ in the decoder only (the trunk has weights "none": one Encoder serves them all)."""
    torch.manual_seed(seed)
    encoder_cfg = EncoderConfig("resnet18", "none", grid=14, image_size=224)
    decoder_cfg = DecoderConfig()
    vocab = Vocab([f"w{i}" for i in range(COCO_VOCAB - 4)])
    decoder = build_decoder(decoder_cfg, len(vocab), encoder_cfg.feature_dim)
    model = CaptionModel(decoder, vocab, encoder_cfg, decoder_cfg)
    return str(save_checkpoint(directory / f"bench-attention-{seed}", model))


def photos(n: int, seed: int = 0) -> list[bytes]:
    """COCO-sized (640x480) JPEGs of smooth random colour fields."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def request_flops(
    checkpoint: str, images: list[bytes], batch: int, beam: int, max_len: int, profile: bool
) -> tuple[float, Reference]:
    """(Useful FLOPs of one request, averaged over `images`; the matmul rate of the two deployments'
    model passes at `batch` images), optionally printing the top ops of one batch of each."""
    model = load_checkpoint(checkpoint)
    encoder = Encoder(dataclasses.replace(model.encoder_cfg, weights="none"))  # the same FLOPs, no download
    pixels = np.stack([encoder.preprocess(image)[0] for image in images])  # (n, S, S, 3) uint8
    features = encoder.encode(pixels)  # (n, P, C)
    search = functools.partial(beam_search, model.decoder, features, model.vocab.start_id, model.vocab.end_id, beam,
                               max_len)  # fmt: skip
    useful = (counted_flops(lambda: encoder.encode(pixels)) + counted_flops(search)) / len(images)
    full = np.resize(pixels, (batch, *pixels.shape[1:]))  # (batch, S, S, 3): one full batch
    steps = max_len + 1  # at most: max_len words, then <end>
    grid = model.decoder.at_grid(features).size(1)
    matmuls = module_matmuls(encoder, torch.from_numpy(full)) + decoder_matmuls(
        model.decoder_cfg, len(model.vocab), grid, features.size(2), batch, beam, steps, search=True
    )
    if profile:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        batched = torch.from_numpy(full)
        print(f"\nprofile: one Encoder batch and one Decoder batch of {batch} images, 1 thread", flush=True)
        print(profile_table(lambda: encoder.encode(batched), torch.device("cpu")), flush=True)
        many = encoder.encode(batched)
        print(profile_table(lambda: beam_search(model.decoder, many, model.vocab.start_id, model.vocab.end_id, beam,
                                                max_len), torch.device("cpu")), flush=True)  # fmt: skip
        torch.set_num_threads(threads)
    return useful, reference(matmuls, training=False, device=torch.device("cpu"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def closed_loop(
    url: str, images: list[bytes], concurrency: int, seconds: float, max_requests: int, models: Sequence[str] = ()
) -> dict[str, float]:
    """`concurrency` clients posting images back to back until `seconds` pass or `max_requests` are
    sent; request i asks for model i mod len(`models`) (none: the default)."""
    latencies: list[float] = []
    failures = 0
    counter = itertools.count()
    deadline = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def client() -> None:
            nonlocal failures
            while time.perf_counter() < deadline and (i := next(counter)) < max_requests:
                start = time.perf_counter()
                params = {"model": models[i % len(models)]} if models else None
                headers = {"Content-Type": "image/jpeg"}
                async with session.post(url, data=images[i % len(images)], params=params, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        latencies.append(time.perf_counter() - start)
                    else:
                        failures += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "failures": failures,
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
    }


async def watch_replicas(stop: asyncio.Event, t0: float, timeline: list[tuple[float, int, int]]) -> None:
    """Sample (seconds since t0, Encoder, Decoder) running replicas each second until `stop`."""
    while not stop.is_set():
        counts = await asyncio.to_thread(replica_counts, APP_NAME)
        timeline.append((round(time.monotonic() - t0, 1), counts.get("Encoder", 0), counts.get("Decoder", 0)))
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            pass


async def autoscaling_phase(
    url: str, images: list[bytes], concurrency: int, sustain_s: float, idle_s: float, min_replicas: int
) -> tuple[list[tuple[float, int, int]], float]:
    """Replica counts over `sustain_s` of load, then over idle until the Decoder is back to
    `min_replicas` (at most `idle_s`): (timeline, seconds at which the load stopped)."""
    timeline: list[tuple[float, int, int]] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    watcher = asyncio.create_task(watch_replicas(stop, t0, timeline))
    load = await closed_loop(url, images, concurrency, sustain_s, max_requests=1_000_000)
    load_end = time.monotonic() - t0
    print(f"sustained load: {load['requests']} requests at {load['rps']:.1f}/s, {load['failures']} failed", flush=True)
    while time.monotonic() - t0 < load_end + idle_s:
        await asyncio.sleep(1.0)
        if timeline[-1][0] > load_end + 5 and timeline[-1][2] <= min_replicas:
            break
    stop.set()
    await watcher
    return timeline, load_end


def _changes(timeline: list[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
    """The samples where a count changed, plus the first and last."""
    kept = [s for i, s in enumerate(timeline) if i == 0 or s[1:] != timeline[i - 1][1:]]
    return kept if kept[-1] == timeline[-1] else [*kept, timeline[-1]]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "serve_config.yaml"))
    parser.add_argument("--checkpoint", default=None, help="a real checkpoint instead of the random one made here")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per (mode, concurrency)")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--max-requests", type=int, default=5000, help="per (mode, concurrency)")
    parser.add_argument("--max-len", type=int, default=20, help="words per caption (COCO captions average ~10)")
    parser.add_argument("--sustain-s", type=float, default=60.0, help="load held for the autoscaling phase")
    parser.add_argument("--idle-s", type=float, default=90.0, help="idle time allowed for scaling back down")
    parser.add_argument("--quick", action="store_true", help="3 s per level, 20 s sustained: a smoke run")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one batch per deployment")
    parser.add_argument(
        "--models", action="store_true", help="add the multiplexing phase: one model, then two alternating"
    )
    args = parser.parse_args(argv)
    if args.models and args.checkpoint:
        parser.error("--models serves two random checkpoints of one trunk: leave out --checkpoint")
    if args.quick:
        args.seconds, args.warmup_s, args.sustain_s, args.idle_s = 3.0, 1.0, 20.0, 60.0

    ray.init(include_dashboard=False)
    tmp = tempfile.TemporaryDirectory(prefix="raycap-bench-")
    checkpoint = args.checkpoint or make_checkpoint(Path(tmp.name))
    port = free_port()
    base = load_config(args.config, checkpoint=checkpoint, port=port)
    (app,) = base.applications
    settings = {d.name: d for d in app.deployments}
    batch_sizes = {name: settings[name].user_config["max_batch_size"] for name in ("Encoder", "Decoder")}
    scaling = settings["Decoder"].autoscaling_config

    def config(batched: bool, pinned: bool, models: dict[str, str] | None = None) -> ServeDeploySchema:
        deployments = {
            name: {**(PINNED if pinned else {}), "user_config": {"max_batch_size": size if batched else 1}}
            for name, size in batch_sizes.items()
        }
        deployments["Decoder"]["user_config"]["max_decode_len"] = args.max_len
        overrides = {"deployments": deployments, "logging_config": {"enable_access_log": False}}  # 3 lines a request
        one = None if models else checkpoint
        return load_config(args.config, checkpoint=one, port=port, overrides=overrides, models=models)

    images = photos(8)
    start = time.monotonic()
    url = deploy(config(batched=True, pinned=True)) + "/caption"
    print(f"deployed in {time.monotonic() - start:.0f} s; {checkpoint}; batch sizes {batch_sizes}", flush=True)
    header = f"{'concurrency':>11} {'mode':>9} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'requests':>8} {'failed':>6}"
    print(header, flush=True)
    results: dict[str, dict[str, dict[str, float]]] = {"batched": {}, "unbatched": {}}
    for level, concurrency in enumerate(args.concurrency):
        modes = ["batched", "unbatched"] if level % 2 == 0 else ["unbatched", "batched"]
        for mode in modes:
            deploy(config(batched=mode == "batched", pinned=True))
            asyncio.run(closed_loop(url, images, concurrency, args.warmup_s, args.max_requests))
            r = asyncio.run(closed_loop(url, images, concurrency, args.seconds, args.max_requests))
            results[mode][str(concurrency)] = {k: round(v, 2) for k, v in r.items()}
            row = f"{concurrency:>11} {mode:>9} {r['rps']:>7.2f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f}"
            print(f"{row} {r['requests']:>8} {r['failures']:>6}", flush=True)

    top = max(args.concurrency)
    useful, ref = request_flops(checkpoint, images, batch_sizes["Decoder"], BEAM_SIZE, args.max_len, args.profile)
    rps = results["batched"][str(top)]["rps"]
    share = rps * useful / ref.rate
    print(f"\nconcurrency {top}, batched: {rps:.2f} requests/s x {useful / 1e9:.2f} GFLOP = "
          f"{rps * useful / 1e9:.1f} GFLOP/s useful; GEMM rate {ref.rate / 1e9:.1f} GFLOP/s "
          f"({torch.get_num_threads()} threads): share {share:.1%}", flush=True)  # fmt: skip

    multiplexed: dict[str, dict[str, float]] = {}
    if args.models:
        two = {"first": checkpoint, "second": make_checkpoint(Path(tmp.name), seed=1)}
        deploy(config(batched=True, pinned=True, models=two))
        print(f"\nmultiplexing: models {', '.join(two)} on one Decoder replica, concurrency {top}", flush=True)
        print(f"{'concurrency':>11} {'requests go to':>15} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'requests':>8} {'failed':>6}", flush=True)  # fmt: skip
        for mode, models in (("one model", ["first"]), ("two alternating", list(two))):
            asyncio.run(closed_loop(url, images, top, args.warmup_s, args.max_requests, models))
            r = asyncio.run(closed_loop(url, images, top, args.seconds, args.max_requests, models))
            multiplexed[mode] = {k: round(v, 2) for k, v in r.items()}
            row = f"{top:>11} {mode:>15} {r['rps']:>7.2f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f}"
            print(f"{row} {r['requests']:>8} {r['failures']:>6}", flush=True)

    deploy(config(batched=True, pinned=False))
    replicas = f"{scaling['min_replicas']}..{scaling['max_replicas']}"
    target = scaling["target_ongoing_requests"]
    print(f"autoscaling: Decoder {replicas} replicas, target_ongoing_requests {target}; concurrency {top}", flush=True)
    timeline, load_end = asyncio.run(
        autoscaling_phase(url, images, top, args.sustain_s, args.idle_s, scaling["min_replicas"])
    )
    for t, encoders, decoders in _changes(timeline):
        phase = "load" if t <= load_end else "idle"
        print(f"  t={t:>6.1f}s ({phase})  Encoder {encoders}  Decoder {decoders}", flush=True)
    serve.shutdown()
    ray.shutdown()
    tmp.cleanup()

    c8 = results["batched"].get("8", {})
    key = str(top)
    figures = {
        "model": args.checkpoint or "attention 512/512/512, vocab 9490, resnet18 224px grid 14 (random weights)",
        "max_len": args.max_len,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "seconds_per_level": args.seconds,
        "batch_sizes": batch_sizes,
        "batched": results["batched"],
        "unbatched": results["unbatched"],
        "p99_over_p50_c8": round(c8["p99_ms"] / c8["p50_ms"], 2) if c8 else None,
        "decoder_replicas_max": max(d for _, _, d in timeline),
        "decoder_replicas_after_idle": timeline[-1][2],
        "decoder_max_replicas": scaling["max_replicas"],
        "load_stopped_s": round(load_end, 1),
        "replica_timeline": [list(s) for s in _changes(timeline)],  # [seconds, Encoder, Decoder]
        "gflop_per_request": round(useful / 1e9, 3),
        "gemm_gflops": round(ref.rate / 1e9, 1),
        "gemm_share": round(share, 3),
        "ratio": round(results["batched"][key]["rps"] / results["unbatched"][key]["rps"], 2),
    }
    if multiplexed:
        figures["multiplexed"] = multiplexed
        figures["two_over_one"] = round(multiplexed["two alternating"]["rps"] / multiplexed["one model"]["rps"], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
