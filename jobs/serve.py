"""Serve a checkpoint over HTTP with the repo's serve_config.yaml, until Ctrl-C.

    python jobs/serve.py --checkpoint ~/raycap_runs/raycap-attention/checkpoint_000012
    python jobs/serve.py --checkpoint s3://bucket/models/attention --port 8080 --address auto

The same as `serve run serve_config.yaml` with the checkpoint (and port) replaced, without editing
the file. To require a bearer token, set RAYCAP_API_TOKEN, or RAYCAP_API_TOKEN_FILE (a file holding
it), in the environment before starting Ray.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ray import serve

from raycap.config import print_config, run_job
from raycap.runtime import init_ray
from raycap.serve import checkpoint_encoder_config
from raycap.serve_deploy import deploy, load_config

CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="raycap checkpoint folder or s3:// prefix")
    p.add_argument("--config", default=str(CONFIG), help="Serve config file (ServeDeploySchema)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    checkpoint_encoder_config(a.checkpoint)  # a missing or foreign checkpoint fails here, before Ray starts
    config = load_config(a.config, checkpoint=a.checkpoint, port=a.port)
    print_config("serve", config.model_dump(exclude_unset=True))
    init_ray(a.address)
    url = deploy(config)
    print(f"[raycap] serving {a.checkpoint} at {url}/caption (API docs: {url}/docs); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    run_job(main)
