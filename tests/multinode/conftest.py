"""A Ray cluster of three nodes on one machine, and a way to lose one of them.

`cluster` starts a head (the driver's node, where the test's driver stays) and two worker nodes,
`node_a` and `node_b`, with `ray.cluster_utils.Cluster`, as Ray's own tests do: each node its own
raylet, object store and ports, all under one short temp dir. CPUs are logical and the object
stores small, so the three fit in 2 cores. Each worker node carries a custom resource named after it
(`{"node_a": 1}`) and a shared `worker` one, which configs can ask for to keep work off the head;
the head has a `head` one, to keep work there.

`MultiNode.kill` loses a node the way a reclaimed machine goes: its raylet and every process it
started (workers, actors, agents) are SIGKILLed at once, with no chance to hand anything over; the
GCS notices only through its health checks. `MultiNode.add` starts a replacement.

These tests start their own Ray, so they cannot share a session with the default suite's local Ray
(tests/conftest.py's `ray_session`): they are marked `slow`, which `make test` leaves out, and run
alone with `make test-slow`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import ray
from ray._private import ray_constants
from helpers import cmdline, descendants
from ray.cluster_utils import Cluster

OBJECT_STORE_BYTES = 150 * 2**20  # per node; Ray's test clusters use the same
WORKER_RESOURCE = "worker"  # every worker node has 1, the head none
HEAD_RESOURCE = "head"  # the head has 1


@dataclass
class MultiNode:
    """The running cluster: its head and worker nodes by name, and how to lose or add one."""

    HEAD_CPUS: ClassVar[int] = 1
    NODE_CPUS: ClassVar[int] = 3

    cluster: Cluster
    nodes: dict[str, ray._private.node.Node] = field(default_factory=dict)

    def add(self, name: str) -> ray._private.node.Node:
        """Start worker node `name` (resources `name`: 1 and `worker`: 1) and wait until it joins."""
        node = self.cluster.add_node(
            num_cpus=self.NODE_CPUS, object_store_memory=OBJECT_STORE_BYTES, resources={name: 1, WORKER_RESOURCE: 1}
        )
        self.nodes[name] = node
        return node

    def kill(self, name: str) -> float:
        """SIGKILL worker node `name`'s raylet and everything it started, all at once; returns the
        time.monotonic() of the kill. The GCS is not told: it finds out as it would on a real cluster."""
        node = self.nodes.pop(name)
        assert node is not self.cluster.head_node, "the driver's node: losing the head needs GCS fault tolerance"
        roots = [info.process.pid for infos in node.all_processes.values() for info in infos]
        victims = descendants(roots)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        self.cluster.remove_node(node, allow_graceful=False)  # reaps what was killed; signals nothing alive
        return killed

    def holding(self, title: str) -> dict[str, int]:
        """Node name -> how many of its processes have a title (`ray::Class...`) starting with `title`."""
        counts = {}
        for name, node in self.nodes.items():
            raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
            titles = [cmdline(pid) for pid in descendants([raylet])]
            counts[name] = sum(t.startswith(title.encode()) for t in titles)
        return counts

    def replicas(self, deployment: str) -> dict[str, int]:
        """Node name -> replicas of the raycap application's `deployment` running there."""
        return self.holding(f"ray::ServeReplica:raycap:{deployment}")

    def wait_dead(self, node_id: str, timeout_s: float = 120) -> float:
        """Block until the GCS marks the node dead; returns time.monotonic() then."""
        deadline = time.monotonic() + timeout_s
        while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            assert time.monotonic() < deadline, f"node {node_id} still alive {timeout_s} s after its kill"
            time.sleep(0.2)
        return time.monotonic()


@contextlib.contextmanager
def _unadvertised() -> Iterator[None]:
    """Keep this cluster out of /tmp/ray/ray_current_cluster, where a plain `ray.init()` elsewhere
    on the machine (another test session, a benchmark) would find and join it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
        yield


@pytest.fixture
def cluster() -> Iterator[MultiNode]:
    """A head (the driver's node) and worker nodes `node_a` and `node_b`, the driver connected;
    everything stopped afterwards."""
    if ray.is_initialized():
        pytest.fail("Ray is already running in this session: run the multi-node tests alone (make test-slow)")
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    with _unadvertised():
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": MultiNode.HEAD_CPUS,
                "object_store_memory": OBJECT_STORE_BYTES,
                "resources": {HEAD_RESOURCE: 1},
                "include_dashboard": False,
                "temp_dir": temp_dir,
            },
        )
    multi = MultiNode(cluster, {"head": cluster.head_node})
    try:
        with _unadvertised():
            multi.add("node_a")
            multi.add("node_b")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield multi
    finally:
        ray.shutdown()
        with _unadvertised():
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def figures(capsys: pytest.CaptureFixture[str]) -> Callable[..., None]:
    """Print one line of the node-loss table, past pytest's capture (`make test-slow` shows it)."""

    def show(stage: str, killed: str, expected: str, observed: str, lost: str, recovery: str) -> None:
        with capsys.disabled():
            print(f"\n[multinode] {stage} | killed {killed} | expected {expected} | observed {observed} | "
                  f"lost {lost} | recovery {recovery}", flush=True)  # fmt: skip

    return show


SERVE_REPLICAS = 2  # of the Encoder and of the Decoder: one on each worker node
# Each request waits this long for its batch to fill, so under load every replica holds requests
# when its node goes: a loss catches some in flight.
SERVE_BATCH_WAIT_S = 0.2


@pytest.fixture
def serve_app(cluster: MultiNode, tmp_path: Path) -> Iterator[str]:
    """The repo's serve_config.yaml on `cluster` with a random-weight checkpoint: Encoder and Decoder
    at SERVE_REPLICAS replicas each, on the worker nodes only (Serve spreads them, one per node); the
    HTTP proxy and the Captioner ingress on the head, off the nodes the tests lose (nothing retries
    what a lost Captioner held). Yields the base URL."""
    from helpers import SERVE_CONFIG, free_port, make_checkpoint
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from raycap.serve_deploy import deploy, load_config

    checkpoint = make_checkpoint(tmp_path, "multinode", grid=3, seed=1)
    on_workers = {"num_replicas": SERVE_REPLICAS, "autoscaling_config": None,
                  "ray_actor_options": {"resources": {WORKER_RESOURCE: 0.01}}}  # fmt: skip
    holding = {"batch_wait_timeout_s": SERVE_BATCH_WAIT_S}
    overrides = {
        "deployments": {
            "Captioner": {"ray_actor_options": {"resources": {HEAD_RESOURCE: 0.01}}},
            "Encoder": {**on_workers, "user_config": holding},
            "Decoder": {**on_workers, "user_config": {**holding, "max_decode_len": 12}},
        },
        "logging_config": {"enable_access_log": False},
    }
    config = load_config(SERVE_CONFIG, checkpoint=str(checkpoint), port=free_port(), overrides=overrides)
    head_only = {**config.model_dump(exclude_unset=True), "proxy_location": "HeadOnly"}
    try:
        url = deploy(ServeDeploySchema.model_validate(head_only))
        placed = {stage: cluster.replicas(stage) for stage in ("Encoder", "Decoder")}
        assert all(n == {"head": 0, "node_a": 1, "node_b": 1} for n in placed.values()), f"replicas at {placed}"
        yield url
    finally:
        serve.shutdown()
