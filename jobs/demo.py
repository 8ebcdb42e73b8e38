"""The end-to-end demo on a synthetic COCO-format set (no GPU, no network): `make demo`.

It trains on the set's Karpathy train + restval splits, selects the best epoch on val and reports
on test, as the reference protocol does on COCO.

--config FILE.yaml reads the file's `demo:` section (keys: raycap.demo.DemoConfig's fields, e.g.
`encoder:` or `decoder_dim:`); flags override it.
"""

from __future__ import annotations

from collections.abc import Sequence

from raycap.config import JobParser, print_config, run_job
from raycap.demo import DemoConfig, run_demo


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """Flags (dest: the DemoConfig field) over the `demo:` section of --config."""
    d = DemoConfig()
    p = JobParser(__doc__, "demo")
    p.add_argument("--out", default=d.out, help="output folder")
    p.add_argument("--train", dest="n_train", metavar="N", type=int, default=d.n_train, help="synthetic train2017 images")
    p.add_argument("--val", dest="n_val", metavar="N", type=int, default=d.n_val, help="synthetic val2017 images")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument(
        "--captions-per-step", type=int, default=d.captions_per_step,
        help="captions per optimizer step, all workers together (lr scaled linearly from 32)",
    )
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="Ray Train workers")
    p.add_argument("--seed", type=int, default=d.seed)
    return p.parse_config(DemoConfig, argv)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    print_config("demo", cfg)
    run_demo(cfg)


if __name__ == "__main__":
    run_job(main)
