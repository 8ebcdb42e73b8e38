r"""Caption every image under a folder or s3:// prefix through the Ray Serve deployments.

    ray job submit --working-dir . -- python jobs/caption_bucket.py \
        --source s3://bucket/photos --out s3://bucket/captions --checkpoint s3://bucket/models/attention
    python jobs/caption_bucket.py --source photos/ --out captions/ --checkpoint CKPT --include '*.jpg' --limit 100
    python jobs/caption_bucket.py --source s3://bucket/photos --out s3://bucket/captions --dry-run

Writes <out>/results/part-*.parquet (or .jsonl): one row per file with key, caption, score, model,
status and error; and <out>/summary.json. Rerunning with the same --out captions only the files
that have no row yet. Uses the running Serve application (deploying --checkpoint with
--serve-config when none runs) on the Ray cluster at RAY_ADDRESS, else a local Ray. --config reads
the file's `bulk:` section (keys: the fields of raycap.bulk.BulkConfig); flags override it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

from raycap.bulk import FORMATS, BulkConfig, caption_bucket
from raycap.config import JobParser, print_config, run_job

CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"


def parse_args(argv: Sequence[str] | None = None) -> BulkConfig:
    d = {f.name: f.default for f in fields(BulkConfig)}
    p = JobParser(__doc__, "bulk")
    p.add_argument("--source", required=True, help="folder or s3://bucket/prefix; every file under it is captioned")
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix for results/ and summary.json")
    p.add_argument("--checkpoint", help="deploy the Serve application with this checkpoint if it is not running")
    p.add_argument("--serve-config", default=str(CONFIG), help="Serve config used to deploy the application")
    p.add_argument("--app-name", default=d["app_name"], help="Serve application to use")
    p.add_argument("--http-port", type=int, help="HTTP port when deploying (default: the Serve config's)")
    p.add_argument("--format", default=d["format"], choices=FORMATS)
    p.add_argument("--include", action="append", default=[], help="glob on keys relative to --source (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="glob to leave out (repeatable)")
    p.add_argument("--limit", type=int, help="caption at most this many new files")
    p.add_argument("--dry-run", action="store_true", help="only count what would be captioned")
    p.add_argument("--beam-size", type=int, default=d["beam_size"])
    p.add_argument("--max-image-bytes", type=int, default=d["max_image_bytes"], help="larger files become error rows")
    p.add_argument("--clients", type=int, default=d["clients"], help="caption client actors")
    p.add_argument("--in-flight", type=int, default=d["in_flight"], help="requests each client keeps outstanding")
    p.add_argument("--read-batch-size", type=int, default=d["read_batch_size"], help="files per read task")
    p.add_argument("--retries", type=int, default=d["retries"], help="extra attempts for failed reads and requests")
    p.add_argument("--rows-per-shard", type=int, default=d["rows_per_shard"])
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    return p.parse_config(BulkConfig, argv)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    print_config("bulk", cfg)
    summary = caption_bucket(cfg)
    print(json.dumps(asdict(summary), indent=2))
    if summary.dry_run:
        print(f"[raycap] bulk: dry run: {summary.todo} of {summary.matched} matching files would be captioned")
    else:
        print(f"[raycap] bulk: results in {summary.out}/results/, summary in {summary.out}/summary.json")


if __name__ == "__main__":
    run_job(main)
