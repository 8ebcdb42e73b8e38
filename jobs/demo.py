"""The end-to-end demo on a synthetic COCO-format set (no GPU, no network): `make demo`."""

from __future__ import annotations

import argparse

from raycap.demo import DemoConfig, run_demo


def main(argv: list[str] | None = None) -> None:
    d = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=d.out, help="output folder")
    p.add_argument("--train", type=int, default=d.n_train, help="synthetic training images")
    p.add_argument("--val", type=int, default=d.n_val, help="synthetic validation images")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="Ray Train workers")
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    run_demo(DemoConfig(out=a.out, n_train=a.train, n_val=a.val, epochs=a.epochs, num_workers=a.num_workers, seed=a.seed))


if __name__ == "__main__":
    main()
