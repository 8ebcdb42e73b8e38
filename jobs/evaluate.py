"""Score a trained checkpoint on a split of extracted features.

    python jobs/evaluate.py --checkpoint ~/raycap_runs/raycap-attention          # the run: its best checkpoint
    python jobs/evaluate.py --checkpoint s3://bucket/runs/raycap-attention/checkpoint_... --out s3://bucket/eval
    python jobs/evaluate.py --config configs/coco.yaml --split val:even --official
    python jobs/evaluate.py --checkpoint RUNS/raycap-attention/latest --compare RUNS/raycap-gru

--checkpoint (and --compare) take a checkpoint folder, or a training run's folder (its best checkpoint
by the selection split's BLEU-4), <run>/best or <run>/latest; the job says which checkpoint it picked.
By default it scores the checkpoint's report split on the features it was trained from (both
recorded in the checkpoint). Features made by another encoder than the checkpoint's are refused. A
split that holds images the checkpoint was trained on is refused (--allow-train-overlap scores it
anyway); the selection split is scored but labelled optimistic.
--official also scores with the COCO caption toolkit's Java tokenizer and METEOR (needs java).
Writes predictions (COCO results format), a metrics JSON and attention pictures (attention model).
--compare CHECKPOINT (repeatable) captions the same images with other checkpoints of the same
encoder and writes a side-by-side sheet (compare_SPLIT.html and .png): each image, its references
and each model's caption with per-image BLEU-4/CIDEr-D, where the models disagree most first.
--config reads the file's `evaluate:` section (keys: raycap.evaluate.EvaluateConfig's fields);
flags override it.
"""

from __future__ import annotations

from collections.abc import Sequence

from raycap.config import JobParser, print_config, run_job
from raycap.evaluate import EvaluateConfig, compare_table, evaluate_checkpoint, metrics_table


def parse_args(argv: Sequence[str] | None = None) -> EvaluateConfig:
    """Flags (EvaluateConfig's, dest: the field) over the `evaluate:` section of --config."""
    return JobParser(__doc__, "evaluate", EvaluateConfig).parse_config(argv)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    print_config("evaluate", cfg)
    result = evaluate_checkpoint(cfg)
    print(metrics_table({result.label: result.metrics}, header="split"))
    if result.official is not None:
        print(f"\n{len(result.predictions)} images of {result.label}, raycap's scorer vs the COCO toolkit's:")
        print(compare_table(result.metrics, result.official))
    if result.models:
        print(f"\nthe same {len(result.predictions)} images, every model:")
        print(metrics_table(result.models))
    print(f"predictions: {result.predictions_file}\nmetrics: {result.metrics_file}")
    for path in result.sheet:
        print(f"comparison sheet: {path}")
    for path in result.pictures:
        print(f"attention picture: {path}")


if __name__ == "__main__":
    run_job(main)
