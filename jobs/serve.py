"""Serve a checkpoint over HTTP with the repo's serve_config.yaml, until Ctrl-C.

    python jobs/serve.py --checkpoint ~/raycap_runs/raycap-attention/checkpoint_000012
    python jobs/serve.py --checkpoint s3://bucket/models/attention --port 8080 --address auto
    python jobs/serve.py --model attention=RUNS/attention/checkpoint_000012 --model gru=RUNS/gru/checkpoint_000012

The same as `serve run serve_config.yaml` with the checkpoint (and port) replaced, without editing
the file. --model NAME=CHECKPOINT (repeatable, the first the default) serves several models at once
(requests pick one with ?model=NAME; GET /models lists them); they must share one encoder trunk.
--s3-endpoint (or AWS_ENDPOINT_URL) selects an S3-compatible server for an s3://
checkpoint, here and in the Serve replicas. To require a bearer token, set RAYCAP_API_TOKEN, or
RAYCAP_API_TOKEN_FILE (a file holding it), in the environment before starting Ray.
"""

from __future__ import annotations

import argparse
import time

from ray import serve

from raycap.config import JobParser, print_config, run_job
from raycap.models.checkpoint import read_meta
from raycap.runtime import init_ray
from raycap.serve_deploy import deploy, load_config
from raycap.serve_schema import SERVE_CONFIG


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Overrides of the Serve config file (its own settings live in it), and --s3-endpoint."""
    p = JobParser(__doc__, None)  # no --config section: --config here is the Serve config file
    one = p.add_mutually_exclusive_group(required=True)
    one.add_argument("--checkpoint", help="raycap checkpoint folder or s3:// prefix, served as one model")
    one.add_argument("--model", action="append", dest="models", metavar="NAME=CHECKPOINT",
                     help="a model to serve among several (repeatable; the first is the default)")  # fmt: skip
    p.add_argument("--config", metavar="FILE.yaml", default=SERVE_CONFIG, help="Serve config file (ServeDeploySchema)")
    p.add_argument("--port", type=int, help="HTTP port (default: the config's)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    return argparse.Namespace(**p.parse_values(argv))


def _models(pairs: list[str]) -> dict[str, str]:
    """--model NAME=CHECKPOINT values -> {name: checkpoint}, in order."""
    models: dict[str, str] = {}
    for pair in pairs:
        name, sep, checkpoint = pair.partition("=")
        if not (sep and name and checkpoint) or name in models:
            raise ValueError(f"--model {pair!r}: expected NAME=CHECKPOINT with a new NAME")
        models[name] = checkpoint
    return models


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    models = _models(a.models) if a.models else None
    if models:
        from raycap.serve import check_one_trunk  # imports torch: not for --help

        check_one_trunk(models)  # also reads each checkpoint: failing here, before Ray starts
    else:
        read_meta(a.checkpoint)  # a missing, foreign or unknown-format checkpoint fails here, before Ray starts
    config = load_config(a.config, checkpoint=a.checkpoint, port=a.port, models=models)
    print_config("serve", config.model_dump(exclude_unset=True))
    init_ray(a.address)
    url = deploy(config)  # its replicas get this process's S3 endpoint (--s3-endpoint) too
    where = f"{url}/caption (page: {url}/, API docs: {url}/docs)"
    print(f"[raycap] serving {', '.join(models or [a.checkpoint])} at {where}; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    run_job(main)
