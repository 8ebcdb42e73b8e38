"""Score a trained checkpoint on a split of extracted features.

    python jobs/evaluate.py --checkpoint ~/raycap_runs/raycap-attention/checkpoint_... --features demo_out/features

Writes predictions (COCO results format), a metrics JSON and attention pictures (attention model).
"""

from __future__ import annotations

import argparse

from raycap.evaluate import evaluate_checkpoint, metrics_table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by jobs/train.py")
    p.add_argument("--features", required=True, help="extraction output root (folder or s3:// prefix)")
    p.add_argument("--split", default="val", help="split to score (val, test, ...)")
    p.add_argument("--out", default="eval_out", help="folder for predictions, metrics and pictures")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--pictures", type=int, default=4, help="attention pictures to draw (attention model)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    a = p.parse_args(argv)
    result = evaluate_checkpoint(
        a.checkpoint, a.features, a.out, a.split, a.beam_size, a.max_len, a.pictures, a.s3_endpoint
    )
    print(metrics_table({a.split: result.metrics}))
    print(f"predictions: {result.predictions_file}\nmetrics: {result.metrics_file}")
    for path in result.pictures:
        print(f"attention picture: {path}")


if __name__ == "__main__":
    main()
