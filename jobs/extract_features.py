r"""Extract encoder features to Parquet with Ray Data; reruns resume where the last run stopped.

    python jobs/extract_features.py --coco-root data/coco --out features/
    python jobs/extract_features.py --images s3://bucket/photos --out s3://bucket/features
    python jobs/extract_features.py --coco-root data/synthetic --out /tmp/f \
        --arch efficientnet_lite0 --image-size 224 --grid 7
    python jobs/extract_features.py --config configs/coco.yaml --limit 1000

--config reads the file's `extract:` section (keys: raycap.features.ExtractConfig's fields);
flags given on the command line override it. Uses the Ray cluster at RAY_ADDRESS, else starts a
local one. S3 credentials come from the standard AWS chain; --s3-endpoint (or AWS_ENDPOINT_URL)
selects an S3-compatible server.
"""

from __future__ import annotations

from collections.abc import Sequence

from raycap.config import JobParser, print_config, run_job
from raycap.features import ExtractConfig, extract_features


def parse_args(argv: Sequence[str] | None = None) -> ExtractConfig:
    """Flags (ExtractConfig's, dest: the field) over the `extract:` section of --config."""
    return JobParser(__doc__, "extract", ExtractConfig).parse_config(argv)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    print_config("extract", cfg)
    result = extract_features(cfg)
    print(f"features, captions and errors under {result.out} ({result.seconds:.1f} s)")
    print(f"  features: {result.spec.describe()}")
    for split, s in result.splits.items():
        print(
            f"  {split}: {s.ok}/{s.images} extracted ({s.new_ok} new, {s.converted} converted to RGB), "
            f"{s.failed} failed ({s.new_failed} new), {s.pending} pending, {s.bytes_per_image / 1024:.1f} KiB/image"
        )
        if s.failed:
            print(f"    why each failed: {result.out}/errors/{split}/")
    if result.vocab_size is not None:
        print(f"  vocabulary: {result.vocab_size} words in {result.out}/vocab.json")


if __name__ == "__main__":
    run_job(main)
