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
from dataclasses import fields

from raycap.config import JobParser, print_config, run_job
from raycap.data.coco import SPLITS
from raycap.feature_store import DTYPES
from raycap.features import ExtractConfig, extract_features
from raycap.models.encoder import FEATURE_DIMS, WEIGHTS_HELP, EncoderConfig


def parse_args(argv: Sequence[str] | None = None) -> ExtractConfig:
    """Flags (dest: the ExtractConfig field) over the `extract:` section of --config."""
    d = {f.name: f.default for f in fields(ExtractConfig)}
    e = EncoderConfig()
    p = JobParser(__doc__, "extract")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--coco-root", help="COCO layout: annotations/captions_{split}{year}.json and {split}{year}/")
    source.add_argument("--images", help="a folder or s3:// prefix of images without annotations (ids hash the key)")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--karpathy-file", help="Karpathy's dataset_coco.json, for its splits (paths relative to --coco-root)")
    p.add_argument("--splits", nargs="+", default=list(d["splits"]), choices=SPLITS)
    p.add_argument("--year", type=int, default=d["year"])
    p.add_argument("--images-split", default=d["images_split"], help="split name for --images")
    p.add_argument("--arch", dest="encoder.arch", default=e.arch, choices=sorted(FEATURE_DIMS))
    p.add_argument("--weights", dest="encoder.weights", default=e.weights, help=WEIGHTS_HELP)
    p.add_argument("--grid", dest="encoder.grid", type=int, default=e.grid, help="the decoder pools features to grid x grid")
    p.add_argument("--image-size", dest="encoder.image_size", type=int, default=e.image_size)
    p.add_argument("--dtype", default=d["dtype"], choices=sorted(DTYPES))
    p.add_argument(
        "--stored-grid", type=int, default=d["stored_grid"],
        help="store features pooled to this grid (default: the trunk's native grid, e.g. 8 for resnet101 at 256)",
    )
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="images per encoder call")
    p.add_argument(
        "--encoders", dest="num_encoders", metavar="N", type=int, default=d["num_encoders"],
        help="encoder actors (default: one per GPU, else 1)",
    )
    p.add_argument("--encoder-cpus", type=float, default=d["encoder_cpus"], help="CPU slots per encoder actor without GPUs")
    p.add_argument("--torch-threads", type=int, default=d["torch_threads"], help="intra-op threads per CPU encoder")
    p.add_argument("--decode-batch-size", type=int, default=d["decode_batch_size"], help="images per decode task")
    p.add_argument(
        "--decode-cpus", type=float, default=d["decode_cpus"], help="CPU slots per decode task; keep != --encoder-cpus"
    )
    p.add_argument("--rows-per-shard", type=int, default=d["rows_per_shard"])
    p.add_argument("--limit", type=int, default=d["limit"], help="encode at most this many new images per split")
    p.add_argument("--min-freq", type=int, default=d["min_freq"], help="vocabulary: minimum word count in train captions")
    p.add_argument("--max-words", type=int, default=d["max_words"], help="vocabulary: words kept per training caption")
    p.add_argument("--s3-endpoint", default=d["s3_endpoint"], help="S3-compatible endpoint URL (default AWS_ENDPOINT_URL)")
    return p.parse_config(ExtractConfig, argv)


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
