"""Train caption decoders with Ray Train from extracted features.

    ray job submit --working-dir . -- python jobs/train.py --features s3://bucket/coco-features --model both
    python jobs/train.py --features demo_out/features --train-splits train restval --select-split val --report-split test
    python jobs/train.py --config configs/coco.yaml --num-workers 8 --plan

A step is --captions-per-step captions, all workers together (the reference: 32 at lr 4e-4);
--lr-rule linear scales the lr for other step sizes, with warmup. At start the job prints its plan
(images, captions, steps per epoch, lr); --plan prints it from the features and exits, without Ray.
Rerunning with the same --run-name (default raycap-<model>) resumes from the latest checkpoint.
--config reads the file's `train:` section (keys: raycap.train.TrainJobConfig's fields, with
`decoder:` and `train:` nested; `decoder.kind` may be `both`); flags override it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from raycap.config import JobParser, from_dict, print_config, run_job, to_plain
from raycap.models.decoders import DecoderConfig
from raycap.recipe import LR_RULES, TrainConfig
from raycap.train import TrainJobConfig, plan_lines, plan_run, train_models

BOTH = "both"


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The resolved `train:` section: TrainJobConfig fields, `decoder.kind` possibly "both"."""
    d, t, j = DecoderConfig(), TrainConfig(), TrainJobConfig(features="")
    p = JobParser(__doc__, "train")
    p.add_argument("--features", required=True, help="extraction output root (folder or s3:// prefix)")
    p.add_argument(
        "--model", dest="decoder.kind", choices=["attention", "gru", BOTH], default=BOTH, help="decoder(s) to train"
    )
    p.add_argument("--epochs", dest="train.epochs", type=int, default=t.epochs)
    p.add_argument(
        "--captions-per-step", dest="train.captions_per_step", type=int, default=t.captions_per_step,
        help="captions per optimizer step, all workers together (a multiple of --num-workers)",
    )
    p.add_argument(
        "--captions-per-image", type=int, default=j.captions_per_image, help="(image, caption) pairs per image and epoch"
    )
    p.add_argument("--lr", dest="train.lr", type=float, default=t.lr, help="learning rate at 32 captions per step")
    p.add_argument(
        "--lr-rule", dest="train.lr_rule", choices=LR_RULES, default=t.lr_rule,
        help="linear: lr x captions-per-step / 32, warmed up; none: --lr as given",
    )
    p.add_argument(
        "--warmup-epochs", dest="train.warmup_epochs", type=float, default=t.warmup_epochs,
        help="linear rule: epochs to ramp from --lr to the scaled lr",
    )
    p.add_argument("--grad-clip", dest="train.grad_clip", type=float, default=t.grad_clip)
    p.add_argument(
        "--alpha-c", dest="train.alpha_c", type=float, default=t.alpha_c, help="doubly stochastic attention weight"
    )
    p.add_argument("--lr-decay", dest="train.lr_decay", type=float, default=t.lr_decay)
    p.add_argument(
        "--decay-patience", dest="train.decay_patience", type=int, default=t.decay_patience,
        help="epochs without better BLEU-4 before lr decay",
    )
    p.add_argument("--early-stop-patience", dest="train.early_stop_patience", type=int, default=t.early_stop_patience)
    p.add_argument(
        "--beam-size", dest="train.beam_size", type=int, default=t.beam_size, help="beam size for validation captions"
    )
    p.add_argument("--embed-dim", dest="decoder.embed_dim", type=int, default=d.embed_dim)
    p.add_argument("--decoder-dim", dest="decoder.decoder_dim", type=int, default=d.decoder_dim)
    p.add_argument("--attention-dim", dest="decoder.attention_dim", type=int, default=d.attention_dim)
    p.add_argument("--dropout", dest="decoder.dropout", type=float, default=d.dropout)
    p.add_argument(
        "--train-splits", nargs="+", default=j.train_splits, help="splits to train on (Karpathy: train restval)"
    )
    p.add_argument(
        "--select-split", default=j.select_split, help="split for lr decay, early stopping, best checkpoint"
    )
    p.add_argument("--report-split", default=j.report_split, help="split jobs/evaluate.py scores by default")
    p.add_argument("--num-workers", type=int, default=j.num_workers, help="Ray Train workers (DDP ranks)")
    p.add_argument(
        "--use-gpu", action=argparse.BooleanOptionalAction, default=j.use_gpu, help="default: if the cluster has GPUs"
    )
    p.add_argument("--cpus-per-worker", type=float, default=j.cpus_per_worker)
    p.add_argument("--storage-path", default=j.storage_path, help="folder or s3:// prefix for runs and checkpoints")
    p.add_argument("--run-name", default=j.run_name, help="default raycap-<model>; the same name resumes")
    p.add_argument("--max-failures", type=int, default=j.max_failures)
    p.add_argument("--s3-endpoint", default=j.s3_endpoint, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--seed", dest="train.seed", type=int, default=t.seed)
    p.add_argument("--plan", action="store_true", help="print the plan from the features' counts and exit")
    return p.parse_values(argv, TrainJobConfig)


def job_configs(values: dict[str, Any]) -> list[TrainJobConfig]:
    """One TrainJobConfig per decoder kind; with both, run names get a -<kind> suffix."""
    values = {k: v for k, v in values.items() if k != "plan"}
    kind = values["decoder"]["kind"]
    kinds = ["attention", "gru"] if kind == BOTH else [kind]
    run_name = values.get("run_name")
    return [
        from_dict(
            TrainJobConfig,
            {
                **values,
                "decoder": {**values["decoder"], "kind": k},
                "run_name": f"{run_name}-{k}" if run_name and len(kinds) > 1 else run_name,
            },
            "train",
        )
        for k in kinds
    ]


def main(argv: Sequence[str] | None = None) -> None:
    values = parse_args(argv)
    configs = job_configs(values)  # validates before anything is printed or started
    resolved = to_plain(configs[0])  # every field, in the dataclass's order
    resolved["decoder"]["kind"], resolved["run_name"] = values["decoder"]["kind"], values["run_name"]
    print_config("train", resolved)
    if values["plan"]:  # the same for every decoder kind
        for line in plan_lines(configs[0], *plan_run(configs[0])):
            print(f"[raycap] plan: {line}")
        return
    train_models(configs)


if __name__ == "__main__":
    run_job(main)
