"""Bulk captioning end to end against the Serve deployments' best online throughput, same model, one Ray.

The model and images are bench/serve.py's: the reference attention decoder (512 dims, vocab 9,490,
random weights, so every caption runs all --max-len words) over ResNet-18 14x14 features, and
640x480 JPEGs. The repo's serve_config.yaml is deployed once on a local Ray with one Encoder and one
Decoder replica (pinned, so both phases get the same replicas). Phases, in order:
  1. Serve: closed-loop HTTP clients at each --concurrency for --seconds; its best req/s.
  2. Bulk, --repeats times: `raycap.bulk.caption_bucket` over --images files in a folder (or
     --source) into a fresh output, end to end: listing, Ray Data reads and decoding, client actors
     with handles to the same deployments, committed result shards (one per client batch, so
     bench/shard_clock.py sees every batch: start-up is the time to the first shard, steady state
     the images/s from the first shard to the last). The first run on the cluster also starts Ray
     Data's per-cluster actors (stats, autoscaling coordinator, actor locations: detached, so a
     long-lived cluster has them); every run starts its own client actors and read workers.
  3. Serve again at the best concurrency, so a drift of the shared machine shows.
ratio = bulk images/s end to end (best run) / the best Serve req/s of phases 1 and 3 (goal: >= 0.8);
steady_ratio the same with bulk's best steady state. Serve's levels are steady states (after
--warmup-s), its own start-up (deployment) excluded.

    python bench/bulk.py [--images 600 --concurrency 32 64 --seconds 15 --repeats 2] [--source s3://bucket/prefix]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import ray
import torch
from ray import serve

import serve as serve_bench  # bench/serve.py: its checkpoint, images and HTTP load generator
from raycap import bulk
from raycap.bulk import BulkConfig, caption_bucket, read_results
from raycap.serve_deploy import deploy, load_config
from shard_clock import ShardClock

REPO = Path(__file__).resolve().parents[1]
PINNED = {"num_replicas": 1, "autoscaling_config": None}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "serve_config.yaml"))
    parser.add_argument("--images", type=int, default=600, help="files to write and caption (without --source)")
    parser.add_argument("--source", default=None, help="an existing folder or s3:// prefix of images instead")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per Serve level")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--clients", type=int, default=BulkConfig.clients)
    parser.add_argument("--in-flight", type=int, default=BulkConfig.in_flight)
    parser.add_argument("--repeats", type=int, default=2, help="bulk runs, each into a fresh output")
    args = parser.parse_args(argv)

    # Ray runs its workers (Serve replicas, read tasks, clients) at nice 15; beside other work on a shared
    # machine that alone starves them, so give them the priority of this process and its HTTP clients.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(include_dashboard=False)
    tmp = Path(tempfile.mkdtemp(prefix="raycap-bench-bulk-"))
    checkpoint = serve_bench.make_checkpoint(tmp)
    source = args.source
    if source is None:
        source = str(tmp / "photos")
        Path(source).mkdir()
        for i, data in enumerate(serve_bench.photos(args.images, seed=1)):
            Path(source, f"{i:05d}.jpg").write_bytes(data)
    overrides = {
        "deployments": {"Encoder": PINNED, "Decoder": {**PINNED, "user_config": {"max_decode_len": args.max_len}}},
        "logging_config": {"enable_access_log": False},
    }
    config = load_config(args.config, checkpoint=checkpoint, port=serve_bench.free_port(), overrides=overrides)
    url = deploy(config) + "/caption"
    images = serve_bench.photos(8)

    def serve_rps(concurrency: int) -> float:
        asyncio.run(serve_bench.closed_loop(url, images, concurrency, args.warmup_s, 100_000))
        r = asyncio.run(serve_bench.closed_loop(url, images, concurrency, args.seconds, 100_000))
        print(f"serve  concurrency {concurrency:>3}: {r['rps']:6.2f} req/s, p50 {r['p50_ms']:.0f} ms, "
              f"{r['failures']} failed", flush=True)  # fmt: skip
        return r["rps"]

    online = {c: serve_rps(c) for c in args.concurrency}
    best_c = max(online, key=online.__getitem__)
    runs = []
    for repeat in range(args.repeats):
        cfg = BulkConfig(
            source=source, out=str(tmp / f"captions{repeat}"), clients=args.clients, in_flight=args.in_flight,
            rows_per_shard=args.in_flight,
        )  # fmt: skip
        with ShardClock(os.path.join(cfg.out, bulk.RESULTS_DIR)) as clock:
            start = time.time()
            summary = caption_bucket(cfg)
            timing = clock.timing(start, time.time())
        rows = read_results(cfg.out).num_rows
        assert rows == timing.rows == summary.todo, (rows, timing, summary)
        runs.append(timing)
        print(f"bulk   {rows} files ({summary.new_ok} ok, {summary.new_failed} failed) in {timing.elapsed_s:.1f} s: "
              f"{timing.images_per_s:.2f} images/s end to end; start-up {timing.startup_s:.1f} s, "
              f"steady {timing.steady_images_per_s:.2f} images/s", flush=True)  # fmt: skip
    after = serve_rps(best_c)
    serve.shutdown()
    ray.shutdown()

    best = max(*online.values(), after)
    bulk_rate = max(t.images_per_s for t in runs)
    steady = max(t.steady_images_per_s for t in runs)
    print(f"\nbest of {args.repeats} bulk runs ({os.getloadavg()[0]:.1f} load average): {bulk_rate:.2f} images/s end "
          f"to end, {steady:.2f} steady, start-up {min(t.startup_s for t in runs):.1f} s; best Serve {best:.2f} req/s",
          flush=True)  # fmt: skip
    figures = {
        "model": "attention 512/512/512, vocab 9490, resnet18 224px grid 14 (random weights)",
        "max_len": args.max_len,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "images": rows,
        "load_average": round(os.getloadavg()[0], 1),
        "bulk_images_per_s": round(bulk_rate, 2),
        "bulk_steady_images_per_s": round(steady, 2),
        "bulk_startup_s": round(min(t.startup_s for t in runs), 2),
        "bulk_runs": [
            {"elapsed_s": round(t.elapsed_s, 1), "startup_s": round(t.startup_s, 1), "steady": round(t.steady_images_per_s, 2)}
            for t in runs
        ],
        "bulk_clients_x_in_flight": args.clients * args.in_flight,
        "serve_rps": {str(c): round(v, 2) for c, v in online.items()},
        "serve_rps_after": round(after, 2),
        "serve_best_rps": round(best, 2),
        "ratio": round(bulk_rate / best, 2),
        "steady_ratio": round(steady / best, 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
