"""Serving loses a worker node under load (`serve_app`: 2 Encoder and 2 Decoder replicas, one of each
on node_a and node_b; the HTTP proxy and the Captioner on the head), clients on loopback.

Every request answers 200 (those caught on the lost replicas are sent again by the Captioner), and
Serve brings both deployments back to full strength on the surviving node.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import ray
import requests
from helpers import image, swap_under_load
from reliability.test_fault_serving import _replica_logs

from raycap.serve_deploy import replica_counts

if TYPE_CHECKING:
    from conftest import MultiNode

pytestmark = pytest.mark.slow

CLIENTS = 4
LOAD_BEFORE_S = 3.0
STAGES = ("Encoder", "Decoder")


@pytest.mark.timeout(480)
def test_losing_a_node_with_an_encoder_and_a_decoder_under_load_fails_no_request_and_replaces_them(
    cluster: MultiNode, serve_app: str, figures: Callable[..., None]
) -> None:
    full = {stage: sum(cluster.replicas(stage).values()) for stage in STAGES}
    images = [image(60 + i) for i in range(8)]
    picks = itertools.count()
    outcomes: list[tuple[float, float, int | str]] = []  # (sent, answered) monotonic, status or error
    sessions = [requests.Session() for _ in range(CLIENTS)]

    def client(session: requests.Session) -> Callable[[], None]:
        def send() -> None:
            sent = time.monotonic()
            try:
                data = images[next(picks) % len(images)]
                status: int | str = session.post(f"{serve_app}/caption", data=data, timeout=120).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            outcomes.append((sent, time.monotonic(), status))

        return send

    node_id = cluster.nodes["node_b"].node_id
    events: dict[str, float] = {}

    def lose_node_b() -> None:
        time.sleep(LOAD_BEFORE_S)  # steady load first
        events["killed"] = cluster.kill("node_b")

    def back_to_full() -> bool:
        if "dead" not in events and not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            events["dead"] = time.monotonic()
        running = replica_counts()
        if "dead" in events and all(sum(cluster.replicas(s).values()) == running.get(s) == full[s] for s in STAGES):
            events.setdefault("full", time.monotonic())
        return "full" in events

    swap_under_load([client(session) for session in sessions], lose_node_b, back_to_full,
                    "came back to full strength with the Encoder after losing node_b")  # fmt: skip
    for session in sessions:
        session.close()
    time.sleep(1.0)  # let the Captioner's log handler flush
    retried = sum(path.read_text().count("was lost mid-request") for path in _replica_logs("Captioner"))
    failed = [o for o in outcomes if o[2] != 200]
    killed = events["killed"]
    spanning = [answered - sent for sent, answered, _ in outcomes if sent <= killed <= answered]
    figures(
        "serving",
        f"node_b (1 Encoder + 1 Decoder replica) after {LOAD_BEFORE_S:.0f} s of load from {CLIENTS} looping clients",
        f"every request 200; Encoder and Decoder back to {full['Encoder']} + {full['Decoder']} replicas",
        f"{len(outcomes)} requests, {len(outcomes) - len(failed)} answered 200, {retried} of them sent again by "
        f"the Captioner; {len(spanning)} spanned the kill (slowest {max(spanning, default=0):.1f} s); replicas "
        f"now {cluster.replicas('Encoder')} / {cluster.replicas('Decoder')}",
        f"{len(failed)} requests",
        f"node_b marked dead {events['dead'] - killed:.1f} s, full capacity {events['full'] - killed:.1f} s "
        "after the kill",
    )
    late = [(round(sent - killed, 1), round(answered - killed, 1), o) for sent, answered, o in failed]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed ((sent, answered) s after the kill): {late}"
    assert retried >= 1, "no request was caught on node_b's replicas: the fault was not exercised"
    assert any(sent > events["full"] for sent, _, _ in outcomes), "no request was sent after the recovery"
