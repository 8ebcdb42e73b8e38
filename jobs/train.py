"""Train caption decoders with Ray Train from extracted features.

    ray job submit --working-dir . -- python jobs/train.py --features s3://bucket/coco-features --model both
    python jobs/train.py --features demo_out/features --train-splits train restval --select-split val --report-split test
    python jobs/train.py --config configs/coco.yaml --num-workers 8 --plan

A step is --captions-per-step captions, all workers together (the reference: 32 at lr 4e-4);
--lr-rule linear scales the lr for other step sizes, with warmup. At start the job prints its plan
(images, captions, steps per epoch, lr); --plan prints it from the features and exits, without Ray.
Each run is new: a --run-name in use (default raycap-<model>) moves on to <name>-2, ...; --resume
continues the named run from its latest checkpoint instead. The run folder (or <run>/best,
<run>/latest) is what jobs/evaluate.py, serve.py and caption_bucket.py take as --checkpoint.
--config reads the file's `train:` section (keys: raycap.train.TrainJobConfig's fields, with
`decoder:` and `train:` nested; `decoder.kind` may be `both`); flags override it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from raycap.config import JobParser, from_dict, print_config, run_job, to_plain
from raycap.models.decoders import DECODERS
from raycap.train import TrainJobConfig, plan_lines, plan_run, train_models

BOTH = "both"


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The resolved `train:` section: TrainJobConfig fields (its flags), `decoder.kind` possibly "both"."""
    model = {"choices": [*DECODERS, BOTH], "default": BOTH, "help": "decoder(s) to train"}
    p = JobParser(__doc__, "train", TrainJobConfig, overrides={"decoder.kind": model})
    p.add_argument("--plan", action="store_true", help="print the plan from the features' counts and exit")
    return p.parse_values(argv)


def job_configs(values: dict[str, Any]) -> list[TrainJobConfig]:
    """One TrainJobConfig per decoder kind; with both, run names get a -<kind> suffix."""
    values = {k: v for k, v in values.items() if k != "plan"}
    kind = values["decoder"]["kind"]
    kinds = list(DECODERS) if kind == BOTH else [kind]
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
