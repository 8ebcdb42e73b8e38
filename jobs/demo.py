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
    """Flags (DemoConfig's, dest: the field) over the `demo:` section of --config."""
    return JobParser(__doc__, "demo", DemoConfig).parse_config(argv)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    print_config("demo", cfg)
    run_demo(cfg)


if __name__ == "__main__":
    run_job(main)
