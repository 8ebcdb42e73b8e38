"""The bulk job loses a worker node mid-run (`serve_app`'s Encoder and Decoder replicas there, and
whatever of the job's read tasks and caption clients Ray put there): the job finishes, or a rerun
does, with exactly one row per key."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import image
from reliability.test_fault_bulk import _assert_exactly_once, _write

from raycap.bulk import BulkConfig, BulkSummary, caption_bucket, read_results, shard_uris

if TYPE_CHECKING:
    from conftest import MultiNode

pytestmark = pytest.mark.slow

FILES = 240
CLIENT_TITLE = "ray::MapWorker(MapBatches(CaptionClient))"
REQUEST_TIMEOUT_S = 20.0  # a request that hangs is tried again after this long (the default is 300 s)


@pytest.mark.timeout(600)
def test_losing_a_node_mid_bulk_job_leaves_one_row_per_key(
    cluster: MultiNode, serve_app: str, figures: Callable[..., None], tmp_path: Path
) -> None:
    source, out = tmp_path / "photos", tmp_path / "captions"
    files = {f"p{i:04d}.jpg": image(400 + i) for i in range(FILES)}
    _write(source, files)
    cfg = BulkConfig(source=str(source), out=str(out), clients=2, in_flight=8, read_batch_size=8, rows_per_shard=16,
                     request_timeout_s=REQUEST_TIMEOUT_S)  # fmt: skip
    outcome: dict[str, BulkSummary | BaseException] = {}

    def run() -> None:
        try:
            outcome["result"] = caption_bucket(cfg)
        except BaseException as exc:  # reported below, then a rerun finishes the job
            outcome["result"] = exc

    runner = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    runner.start()
    while runner.is_alive() and not shard_uris(str(out)) and time.monotonic() - started < 300:
        time.sleep(0.1)
    assert runner.is_alive(), f"the job ended before the kill: {outcome}"
    clients = cluster.holding(CLIENT_TITLE)
    before = len(shard_uris(str(out)))
    node_id = cluster.nodes["node_b"].node_id
    killed = cluster.kill("node_b")
    dead = cluster.wait_dead(node_id)
    resumed = None
    while runner.is_alive():
        if resumed is None and len(shard_uris(str(out))) > before:
            resumed = time.monotonic()
        time.sleep(0.1)
    finished = time.monotonic()
    first = outcome["result"]
    rerun = None
    if not isinstance(first, BulkSummary) or first.pending:
        rerun = caption_bucket(cfg)
    rerun_s = time.monotonic() - finished
    results = read_results(str(out))
    errors = [row for row in results.to_pylist() if row["status"] != "ok"]
    first_run = (
        f"first run done {finished - killed:.1f} s after the kill"
        if isinstance(first, BulkSummary)
        else f"first run failed {finished - killed:.1f} s after the kill ({type(first).__name__}: {str(first)[:200]})"
    )
    figures(
        "bulk",
        f"node_b (1 Encoder + 1 Decoder replica, {clients['node_b']} of the job's 2 caption clients) "
        f"{killed - started:.1f} s in, after {before} shards",
        f"{FILES} keys, one row each, all ok",
        f"{results.num_rows} rows ({len(errors)} errors) in {len(shard_uris(str(out)))} shards"
        + (f"; a rerun added {rerun.new_ok + rerun.new_failed} in {rerun_s:.1f} s" if rerun else "; no rerun needed"),
        f"{len(errors)} rows",
        f"node_b marked dead {dead - killed:.1f} s, next shard {(resumed or finished) - killed:.1f} s after the "
        f"kill; {first_run}",
    )
    _assert_exactly_once(results, {str(source / name) for name in files})
    assert not errors, errors[:5]
