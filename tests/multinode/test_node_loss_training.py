"""DDP training with its 2 workers on 2 worker nodes loses one node mid-run: Ray Train restarts the
worker group, on the surviving node and one that joins afterwards, from the last registered
checkpoint, and the run ends like an uninterrupted one on the same cluster.

Placement by logical CPUs alone: a worker asks for more CPUs than the head has and than half a worker
node, so each worker node holds one and the head none; after the loss the survivor cannot hold both.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import tiny_features
from reliability.test_fault_training import (
    EPOCHS,
    _assert_resumed_like_uninterrupted,
    _checkpoints,
    _job,
    _registered_epoch,
    _train_until_registered,
)

from raycap.train import TrainJobConfig, TrainOutcome, train

if TYPE_CHECKING:
    from conftest import MultiNode

pytestmark = pytest.mark.slow

WORKER_TITLE = "ray::RayTrainWorker"


def _spread_job(cluster: MultiNode, features: str, storage: Path, name: str) -> TrainJobConfig:
    cpus = cluster.NODE_CPUS - 1  # leaves a CPU per node for Ray Data's read tasks
    assert cpus > max(cluster.HEAD_CPUS, cluster.NODE_CPUS / 2), "the workers would not be one per worker node"
    return dataclasses.replace(_job(features, str(storage), name), cpus_per_worker=cpus)


@pytest.mark.timeout(600)
def test_losing_a_workers_node_mid_epoch_resumes_from_the_last_checkpoint_and_ends_like_an_uninterrupted_run(
    cluster: MultiNode, figures: Callable[..., None], tmp_path: Path
) -> None:
    features = tiny_features(tmp_path / "tiny")
    baseline = train(_spread_job(cluster, features, tmp_path, "baseline"))

    run_dir = tmp_path / "lost"
    started = time.monotonic()
    runner, outcome = _train_until_registered(_spread_job(cluster, features, tmp_path, "lost"), run_dir)
    placed = cluster.holding(WORKER_TITLE)
    assert runner.is_alive() and placed == {"head": 0, "node_a": 1, "node_b": 1}, f"workers at {placed}: {outcome}"
    node_id = cluster.nodes["node_b"].node_id
    killed = cluster.kill("node_b")
    registered_at_kill = _registered_epoch(run_dir)
    cluster.add("node_c")  # the replacement machine joins while the GCS still thinks node_b alive
    joined = time.monotonic()
    dead = cluster.wait_dead(node_id)
    while runner.is_alive() and not cluster.holding(WORKER_TITLE)["node_c"]:
        time.sleep(0.1)
    restarted = time.monotonic()
    while runner.is_alive() and _registered_epoch(run_dir) == registered_at_kill:
        time.sleep(0.05)
    progressed = time.monotonic()
    runner.join(timeout=300)
    result = outcome.get("result")
    assert isinstance(result, TrainOutcome), f"run did not finish after the node loss: {result!r}"
    assert registered_at_kill is not None and registered_at_kill < EPOCHS - 1, "the run ended before the kill"

    reported = _checkpoints(run_dir)
    counts = Counter(epoch for _, epoch in reported)
    redone = sum(counts.values()) - len(counts)
    last, reference = result.last_metrics, baseline.last_metrics
    shown = ("train_loss", "val_ce", "bleu1", "bleu4")
    figures(
        "training",
        f"node_b (1 of 2 DDP workers) {killed - started:.1f} s in, during epoch {registered_at_kill + 1} "
        f"({registered_at_kill + 1} of {EPOCHS} registered)",
        f"{EPOCHS} epochs, each registered once; metrics within noise of the uninterrupted run "
        f"({', '.join(f'{k}={reference[k]:.3f}' for k in shown)})",
        f"epochs reported {[e for _, e in reported]}; {', '.join(f'{k}={last[k]:.3f}' for k in shown)}",
        f"{redone} epoch(s) redone",
        f"node_c joined {joined - killed:.1f} s, node_b marked dead {dead - killed:.1f} s, workers restarted on "
        f"node_a + node_c {restarted - killed:.1f} s, next epoch registered {progressed - killed:.1f} s after the kill",
    )
    _assert_resumed_like_uninterrupted(reported, registered_at_kill, last, reference)
