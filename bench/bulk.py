"""Bulk captioning end to end against the Serve deployments' best online throughput, same model, one run.

The model and images are bench/serve.py's: the reference attention decoder (512 dims, vocab 9,490,
random weights, so every caption runs all --max-len words) over ResNet-18 14x14 features, and
640x480 JPEGs. The repo's serve_config.yaml is deployed once on a local Ray with one Encoder and one
Decoder replica (pinned, so both phases get the same replicas). Phases, in order:
  1. Serve: closed-loop HTTP clients at each --concurrency for --seconds; its best req/s.
  2. Bulk: `raycap.bulk.caption_bucket` over --images files in a folder (or --source), end to end:
     listing, Ray Data reads and decoding, handles to the same deployments, committed result shards.
  3. Serve again at the best concurrency, so a drift of the shared machine shows.
ratio = bulk images/s / the best Serve req/s of phases 1 and 3 (goal: >= 0.8).

    python bench/bulk.py [--images 600 --concurrency 32 64 --seconds 15] [--source s3://bucket/prefix]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import ray
import torch
from ray import serve

import serve as serve_bench  # bench/serve.py: its checkpoint, images and HTTP load generator
from raycap.bulk import BulkConfig, caption_bucket, read_results
from raycap.serve_deploy import deploy, load_config

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
    args = parser.parse_args(argv)

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
        "deployments": {"Encoder": PINNED, "Decoder": {**PINNED, "user_config": {"max_len": args.max_len}}},
        "logging_config": {"enable_access_log": False},
    }
    config = load_config(args.config, checkpoint=checkpoint, port=serve_bench._free_port(), overrides=overrides)
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
    cfg = BulkConfig(source=source, out=str(tmp / "captions"), clients=args.clients, in_flight=args.in_flight)
    summary = caption_bucket(cfg)
    rows = read_results(cfg.out).num_rows
    print(f"bulk   {rows} files ({summary.new_ok} ok, {summary.new_failed} failed) in {summary.elapsed_s:.1f} s: "
          f"{summary.images_per_s:.2f} images/s", flush=True)  # fmt: skip
    after = serve_rps(best_c)
    serve.shutdown()
    ray.shutdown()

    best = max(*online.values(), after)
    figures = {
        "model": "attention 512/512/512, vocab 9490, resnet18 224px grid 14 (random weights)",
        "max_len": args.max_len,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "images": rows,
        "bulk_images_per_s": round(summary.images_per_s, 2),
        "bulk_elapsed_s": round(summary.elapsed_s, 1),
        "bulk_clients_x_in_flight": args.clients * args.in_flight,
        "serve_rps": {str(c): round(v, 2) for c, v in online.items()},
        "serve_rps_after": round(after, 2),
        "serve_best_rps": round(best, 2),
        "ratio": round(summary.images_per_s / best, 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
