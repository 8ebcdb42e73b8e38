"""Connecting to Ray the same way in every job: the given cluster, else a local one with headroom;
either way with this process's S3 endpoint handed to every worker."""

from __future__ import annotations

import os

import ray

from raycap import storage

LOCAL_OBJECT_STORE_BYTES = 2 * 2**30  # capped: a laptop's RAM is shared with the models and Ray Data's blocks


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` or RAY_ADDRESS (as under `ray job submit`), if any; else start a
    local Ray whose logical CPUs exceed the cores by 2 (at least 4). Train workers and actor pools
    that claim whole CPUs would otherwise leave Ray Data's read tasks none, and the job would hang.
    The job's workers get this process's S3 endpoint (`storage.worker_env`) through the runtime
    environment: a cluster's nodes do not see --s3-endpoint. Does nothing when this process is
    already connected."""
    if ray.is_initialized():
        return
    env = storage.worker_env()
    runtime_env = {"env_vars": env} if env else None
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address, runtime_env=runtime_env)
        return
    cpus = max(4, (os.cpu_count() or 1) + 2)
    ray.init(
        num_cpus=cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False, runtime_env=runtime_env
    )
