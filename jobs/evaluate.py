"""Score a trained checkpoint on a split of extracted features.

    python jobs/evaluate.py --checkpoint ~/raycap_runs/raycap-attention/checkpoint_...
    python jobs/evaluate.py --config configs/coco.yaml --split val:even --official

By default it scores the checkpoint's report split on the features it was trained from (both
recorded in the checkpoint). A split that holds images the checkpoint was trained on is refused
(--allow-train-overlap scores it anyway); the selection split is scored but labelled optimistic.
--official also scores with the COCO caption toolkit's Java tokenizer and METEOR (needs java).
Writes predictions (COCO results format), a metrics JSON and attention pictures (attention model).
--config reads the file's `evaluate:` section (keys: the fields of EvaluateConfig in this file);
flags override it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from raycap.config import JobParser, print_config, run_job
from raycap.evaluate import compare_table, evaluate_checkpoint, metrics_table
from raycap.recipe import TrainConfig


@dataclass(frozen=True)
class EvaluateConfig:
    """What to score and how; decoding defaults are the recipe's validation settings."""

    checkpoint: str  # checkpoint folder written by jobs/train.py
    features: str | None = None  # extraction output root (folder or s3:// prefix); None: the checkpoint's
    split: str | None = None  # a split reference (test, val:odd, ...); None: the checkpoint's report split
    out: str = "eval_out"
    beam_size: int = TrainConfig.beam_size
    max_decode_len: int = TrainConfig.max_decode_len  # words per caption at most
    allow_unk: bool = False  # let captions hold <unk>, the word for every rare word (banned by default)
    pictures: int = 4  # attention pictures to draw (attention model)
    allow_train_overlap: bool = False  # score a split that holds training images (not a held-out score)
    official: bool = False  # also score with the COCO toolkit's Java tokenizer and METEOR (needs java)
    s3_endpoint: str | None = None  # default: AWS_ENDPOINT_URL, else AWS


def parse_args(argv: Sequence[str] | None = None) -> EvaluateConfig:
    """Flags (dest: the EvaluateConfig field) over the `evaluate:` section of --config."""
    p = JobParser(__doc__, "evaluate")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by jobs/train.py")
    p.add_argument(
        "--features", default=EvaluateConfig.features,
        help="extraction output root (folder or s3:// prefix); default: the checkpoint's",
    )
    p.add_argument(
        "--split", default=EvaluateConfig.split,
        help="split to score (test, val, val:even, ...); default: the checkpoint's report split",
    )
    p.add_argument("--out", default=EvaluateConfig.out, help="folder for predictions, metrics and pictures")
    p.add_argument("--beam-size", type=int, default=EvaluateConfig.beam_size)
    p.add_argument(
        "--max-decode-len", type=int, default=EvaluateConfig.max_decode_len, help="words per caption at most"
    )
    p.add_argument(
        "--allow-unk", action="store_true",
        help="let captions hold <unk> (the word for every rare word); by default beam search never emits it",
    )
    p.add_argument(
        "--pictures", type=int, default=EvaluateConfig.pictures, help="attention pictures to draw (attention model)"
    )
    p.add_argument(
        "--allow-train-overlap", action="store_true",
        help="score a split even if it holds images the checkpoint was trained on (the result is not held out)",
    )
    p.add_argument(
        "--official", action="store_true",
        help="also score with the COCO caption toolkit's Java tokenizer and METEOR, side by side (needs java)",
    )
    p.add_argument("--s3-endpoint", default=EvaluateConfig.s3_endpoint, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    return p.parse_config(EvaluateConfig, argv)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    print_config("evaluate", cfg)
    checkpoint, out = (str(Path(p).expanduser()) for p in (cfg.checkpoint, cfg.out))  # "~" in YAML too
    result = evaluate_checkpoint(
        checkpoint, cfg.features, out, split=cfg.split, beam_size=cfg.beam_size, max_decode_len=cfg.max_decode_len,
        allow_unk=cfg.allow_unk, pictures=cfg.pictures, endpoint=cfg.s3_endpoint,
        allow_train_overlap=cfg.allow_train_overlap, official=cfg.official,
    )  # fmt: skip
    print(metrics_table({result.label: result.metrics}, header="split"))
    if result.official is not None:
        print(f"\n{len(result.predictions)} images of {result.label}, raycap's scorer vs the COCO toolkit's:")
        print(compare_table(result.metrics, result.official))
    print(f"predictions: {result.predictions_file}\nmetrics: {result.metrics_file}")
    for path in result.pictures:
        print(f"attention picture: {path}")


if __name__ == "__main__":
    run_job(main)
