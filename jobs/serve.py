"""Serve a checkpoint over HTTP with the repo's serve_config.yaml, until stopped.

    python jobs/serve.py --checkpoint ~/raycap_runs/raycap-attention      # a run: its best checkpoint
    python jobs/serve.py --checkpoint s3://bucket/models/attention --port 8080 --address auto
    python jobs/serve.py --model attention=RUNS/attention --model gru=RUNS/gru/latest

The same as `serve run serve_config.yaml` with the checkpoint (and port) replaced, without editing
the file. A checkpoint is a checkpoint folder, a training run's folder or <run>/best (its best
checkpoint by BLEU-4), or <run>/latest; the job says which it picked. --model NAME=CHECKPOINT
(repeatable, the first the default) serves several models at once (requests pick one with
?model=NAME; GET /models lists them); they must share one encoder trunk.
--s3-endpoint (or AWS_ENDPOINT_URL) selects an S3-compatible server for an s3://
checkpoint, here and in the Serve replicas. To require a bearer token, set RAYCAP_API_TOKEN, or
RAYCAP_API_TOKEN_FILE (a file holding it), in the environment before starting Ray.

Stopping: Ctrl-C (or SIGTERM) deletes the application and exits 0, as `serve run` does. Without
--address the job runs its own Ray, which stops with it; joined to a cluster, Serve keeps its other
applications there. From another shell, `serve shutdown -y --address DASHBOARD` (the command the
job prints: Serve's CLI reaches Ray through its dashboard, by default http://localhost:8265) stops
Serve, and the job then exits too. For a Ray that outlives the job, start one (`ray start --head`)
and pass --address auto.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

from raycap.config import JobParser, print_config, run_job
from raycap.serve_schema import APP_NAME, SERVE_CONFIG


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Overrides of the Serve config file (its own settings live in it), and --s3-endpoint."""
    p = JobParser(__doc__, None)  # no --config section: --config here is the Serve config file
    one = p.add_mutually_exclusive_group(required=True)
    one.add_argument("--checkpoint", help="checkpoint folder, run folder (its best), <run>/latest, or s3:// prefix")
    one.add_argument("--model", action="append", dest="models", metavar="NAME=CHECKPOINT",
                     help="a model to serve among several (repeatable; the first is the default)")  # fmt: skip
    p.add_argument("--config", metavar="FILE.yaml", default=SERVE_CONFIG, help="Serve config file (ServeDeploySchema)")
    p.add_argument("--port", type=int, help="HTTP port, 1-65535 (default: the config's)")
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
    # torch and Ray, once the flags are good: --help and usage errors stay quick
    from ray import serve

    from raycap.models.checkpoint import pick_checkpoint
    from raycap.runtime import init_ray, verbose
    from raycap.serve_deploy import check_port_free, deploy, load_config, wait_until_stopped

    if not verbose():  # Serve's notes to this process ("Started Serve", "Deleting app"), as its actors' go to files
        logging.getLogger("ray.serve").setLevel(logging.WARNING)

    # Each checkpoint is found and its meta.json read here, before Ray starts: a missing, foreign or
    # unknown-format checkpoint, or models on different trunks, fail in one line.
    if a.models:
        from raycap.serve import check_one_trunk  # the deployments' module: only for several models

        models = {name: pick_checkpoint(checkpoint) for name, checkpoint in _models(a.models).items()}
        check_one_trunk(models)
        checkpoint = None
    else:
        models, checkpoint = None, pick_checkpoint(a.checkpoint)
    config = load_config(a.config, checkpoint=checkpoint, port=a.port, models=models)
    own_ray = not (a.address or os.environ.get("RAY_ADDRESS"))
    if own_ray:
        check_port_free(config)  # this job's Ray will run the HTTP proxy here
    print_config("serve", config.model_dump(exclude_unset=True))
    dashboard = init_ray(a.address)
    url = deploy(config)  # its replicas get this process's S3 endpoint (--s3-endpoint) too
    stop = f"Ctrl-C, or `serve shutdown -y --address {dashboard}`" if dashboard else "Ctrl-C"  # Serve's CLI needs it
    print(f"[raycap] serving {', '.join(models or [checkpoint])} at {url}/caption (page: {url}/, API docs: "
          f"{url}/docs); stop: {stop}", flush=True)  # fmt: skip
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # docker stop, systemd: as Ctrl-C
    try:
        wait_until_stopped(APP_NAME)
        how = "shut down from elsewhere"
    except KeyboardInterrupt:
        # Only this job's application: serve.shutdown() would also stop a cluster's other applications,
        # and reports its controller's end as a failed task. This job's own Ray ends with the job.
        serve.delete(APP_NAME)
        how = "deleted"
    ray_too = "; this job's Ray stops with it" if own_ray else ""
    print(f"[raycap] stopped: application {APP_NAME!r} {how}{ray_too}", flush=True)


if __name__ == "__main__":
    run_job(main)
