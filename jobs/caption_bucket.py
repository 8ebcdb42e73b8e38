r"""Caption every image under a folder or s3:// prefix through the Ray Serve deployments.

    ray job submit --working-dir . -- python jobs/caption_bucket.py \
        --source s3://bucket/photos --out s3://bucket/captions --checkpoint s3://bucket/models/attention
    python jobs/caption_bucket.py --source photos/ --out captions/ --checkpoint CKPT --include '*.jpg' --limit 100
    python jobs/caption_bucket.py --source s3://bucket/photos --out s3://bucket/captions --dry-run

Writes <out>/results/part-*.parquet (or .jsonl): one row per file with key, caption, score, model,
status and error; <out>/summary.json; and <out>/progress.json, the committed part of the
listing. --model picks one of the application's models (GET /models; default: its default model).
Rerunning with the same --out, --source, --include and --exclude resumes after that part: no file
is captioned twice. Uses the running Serve application (deploying --checkpoint with
--serve-config when none runs) on the Ray cluster at RAY_ADDRESS, else a local Ray, and its request
limits (max_beam_size, max_image_bytes, max_pixels: the `args:` of the Serve config). --config reads
the file's `bulk:` section (keys: the fields of raycap.bulk.BulkConfig); flags override it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

from raycap.bulk import BulkConfig, caption_bucket
from raycap.config import JobParser, print_config, run_job


def parse_args(argv: Sequence[str] | None = None) -> BulkConfig:
    """Flags (BulkConfig's, dest: the field) over the `bulk:` section of --config."""
    return JobParser(__doc__, "bulk", BulkConfig).parse_config(argv)


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
