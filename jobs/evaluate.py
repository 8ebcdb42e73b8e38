"""Score a trained checkpoint on a split of extracted features.

    python jobs/evaluate.py --checkpoint ~/raycap_runs/raycap-attention/checkpoint_... --features demo_out/features
    python jobs/evaluate.py --config configs/coco.yaml --split test

Writes predictions (COCO results format), a metrics JSON and attention pictures (attention model).
--config reads the file's `evaluate:` section (keys: the fields of EvaluateConfig in this file);
flags override it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from raycap.config import JobParser, print_config, run_job
from raycap.evaluate import evaluate_checkpoint, metrics_table
from raycap.recipe import TrainConfig


@dataclass(frozen=True)
class EvaluateConfig:
    """What to score and how; decoding defaults are the recipe's validation settings."""

    checkpoint: str  # checkpoint folder written by jobs/train.py
    features: str  # extraction output root (folder or s3:// prefix)
    split: str = "val"
    out: str = "eval_out"
    beam_size: int = TrainConfig.beam_size
    max_len: int = TrainConfig.max_decode_len
    pictures: int = 4  # attention pictures to draw (attention model)
    s3_endpoint: str | None = None  # default: AWS_ENDPOINT_URL, else AWS


def parse_args(argv: Sequence[str] | None = None) -> EvaluateConfig:
    """Flags (dest: the EvaluateConfig field) over the `evaluate:` section of --config."""
    p = JobParser(__doc__, "evaluate")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by jobs/train.py")
    p.add_argument("--features", required=True, help="extraction output root (folder or s3:// prefix)")
    p.add_argument("--split", default=EvaluateConfig.split, help="split to score (val, test, ...)")
    p.add_argument("--out", default=EvaluateConfig.out, help="folder for predictions, metrics and pictures")
    p.add_argument("--beam-size", type=int, default=EvaluateConfig.beam_size)
    p.add_argument("--max-len", type=int, default=EvaluateConfig.max_len)
    p.add_argument(
        "--pictures", type=int, default=EvaluateConfig.pictures, help="attention pictures to draw (attention model)"
    )
    p.add_argument("--s3-endpoint", default=EvaluateConfig.s3_endpoint, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    return p.parse_config(EvaluateConfig, argv)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    print_config("evaluate", cfg)
    checkpoint, out = (str(Path(p).expanduser()) for p in (cfg.checkpoint, cfg.out))  # "~" in YAML too
    result = evaluate_checkpoint(
        checkpoint, cfg.features, out, cfg.split, cfg.beam_size, cfg.max_len, cfg.pictures, cfg.s3_endpoint
    )
    print(metrics_table({cfg.split: result.metrics}))
    print(f"predictions: {result.predictions_file}\nmetrics: {result.metrics_file}")
    for path in result.pictures:
        print(f"attention picture: {path}")


if __name__ == "__main__":
    run_job(main)
