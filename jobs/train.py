"""Train caption decoders with Ray Train from extracted features.

    ray job submit --working-dir . -- python jobs/train.py --features s3://bucket/coco-features --model both
    python jobs/train.py --features demo_out/features --model attention --num-workers 2

Rerunning with the same --run-name (default raycap-<model>) resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse

from raycap.models.decoders import DecoderConfig
from raycap.recipe import TrainConfig
from raycap.train import TrainJobConfig, train_models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d, t, j = DecoderConfig(), TrainConfig(), TrainJobConfig(features="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, help="extraction output root (folder or s3:// prefix)")
    p.add_argument("--model", choices=["attention", "gru", "both"], default="both", help="decoder(s) to train")
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--batch-size", type=int, default=t.batch_size, help="images per worker step (x captions-per-image pairs)")
    p.add_argument("--captions-per-image", type=int, default=j.captions_per_image)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--grad-clip", type=float, default=t.grad_clip)
    p.add_argument("--alpha-c", type=float, default=t.alpha_c, help="doubly stochastic attention weight")
    p.add_argument("--lr-decay", type=float, default=t.lr_decay)
    p.add_argument("--decay-patience", type=int, default=t.decay_patience, help="epochs without better BLEU-4 before lr decay")
    p.add_argument("--early-stop-patience", type=int, default=t.early_stop_patience)
    p.add_argument("--beam-size", type=int, default=t.beam_size, help="beam size for validation captions")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim)
    p.add_argument("--decoder-dim", type=int, default=d.decoder_dim)
    p.add_argument("--attention-dim", type=int, default=d.attention_dim)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--num-workers", type=int, default=j.num_workers, help="Ray Train workers (DDP ranks)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="default: if the cluster has GPUs")
    p.add_argument("--cpus-per-worker", type=float, default=j.cpus_per_worker)
    p.add_argument("--storage-path", default=j.storage_path, help="folder or s3:// prefix for runs and checkpoints")
    p.add_argument("--run-name", default=None, help="default raycap-<model>; the same name resumes")
    p.add_argument("--max-failures", type=int, default=j.max_failures)
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--seed", type=int, default=t.seed)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    kinds = ["attention", "gru"] if a.model == "both" else [a.model]
    train_cfg = TrainConfig(
        epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, grad_clip=a.grad_clip, alpha_c=a.alpha_c,
        lr_decay=a.lr_decay, decay_patience=a.decay_patience, early_stop_patience=a.early_stop_patience,
        beam_size=a.beam_size, seed=a.seed,
    )
    configs = [
        TrainJobConfig(
            features=a.features,
            decoder=DecoderConfig(kind, a.embed_dim, a.decoder_dim, a.attention_dim, a.dropout),
            train=train_cfg, num_workers=a.num_workers, use_gpu=a.use_gpu, cpus_per_worker=a.cpus_per_worker,
            captions_per_image=a.captions_per_image, storage_path=a.storage_path,
            run_name=f"{a.run_name}-{kind}" if a.run_name and len(kinds) > 1 else a.run_name,
            max_failures=a.max_failures, s3_endpoint=a.s3_endpoint,
        )
        for kind in kinds
    ]
    train_models(configs)


if __name__ == "__main__":
    main()
