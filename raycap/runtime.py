"""Connecting to Ray the same way in every job: the given cluster, else a local one with headroom;
either way with this process's S3 endpoint handed to every worker, and Ray's own chatter (library
INFO logs, deprecation warnings, progress bars redrawn inside Train workers) kept in Ray's log files
rather than the job's output unless `--verbose` (VERBOSE_ENV) asks for it."""

from __future__ import annotations

import logging
import os

import ray

from raycap import storage
from raycap.config import VERBOSE_ENV

LOCAL_OBJECT_STORE_BYTES = 2 * 2**30  # capped: a laptop's RAM is shared with the models and Ray Data's blocks
# Worker settings for a quiet output: Ray Data's INFO logs and progress bars inside Train workers
# (each redraw a line when the output is not a terminal), Python's deprecation warnings from Ray's code,
# the logs of the Serve controller, proxies and replicas that this job starts (kept in logs/serve/).
QUIET_WORKER_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
    "RAY_SERVE_LOG_TO_STDERR": "0",
}


def verbose() -> bool:
    """True when the job was asked (--verbose) to show Ray's own logs in its output."""
    return bool(os.environ.get(VERBOSE_ENV))


def init_ray(address: str | None = None) -> str | None:
    """Join the cluster at `address` or RAY_ADDRESS (as under `ray job submit`), if any; else start a
    local Ray whose logical CPUs exceed the cores by 2 (at least 4). Train workers and actor pools
    that claim whole CPUs would otherwise leave Ray Data's read tasks none, and the job would hang.
    The job's workers get this process's S3 endpoint (`storage.worker_env`) through the runtime
    environment: a cluster's nodes do not see --s3-endpoint. Returns the Ray dashboard's URL (where
    `serve shutdown`/`ray job submit --address` reach this Ray), if any. Does nothing (None) when this
    process is already connected."""
    if ray.is_initialized():
        return None
    if not verbose():  # gRPC's C core logs each fork of this process at INFO ("skipping fork() handlers")
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this process's handles' INFO lines
    env = {**storage.worker_env(), **({} if verbose() else QUIET_WORKER_ENV)}
    quiet = {"logging_level": logging.WARNING, "logging_config": ray.LoggingConfig(log_level="WARNING")}
    quiet = {} if verbose() else quiet
    runtime_env = {"env_vars": env} if env else None
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        context = ray.init(address=address, runtime_env=runtime_env, **quiet)
    else:
        cpus = max(4, (os.cpu_count() or 1) + 2)
        # With its dashboard: Ray Train's placement group cleaner asks the state API behind it whether
        # the controller lives (without one it warns every few seconds), and users expect it on :8265.
        context = ray.init(
            num_cpus=cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES, runtime_env=runtime_env, **quiet
        )
    return f"http://{context.dashboard_url}" if context.dashboard_url else None
