"""Connecting to Ray the same way in every job: the given cluster, else a local one with headroom."""

from __future__ import annotations

import os

import ray

LOCAL_OBJECT_STORE_BYTES = 2 * 2**30  # capped: a laptop's RAM is shared with the models and Ray Data's blocks


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` or RAY_ADDRESS (as under `ray job submit`), if any; else start a
    local Ray whose logical CPUs exceed the cores by 2 (at least 4). Train workers and actor pools
    that claim whole CPUs would otherwise leave Ray Data's read tasks none, and the job would hang.
    Does nothing when this process is already connected."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address)
        return
    cpus = max(4, (os.cpu_count() or 1) + 2)
    ray.init(num_cpus=cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False)
