"""Feature extraction loses the worker node holding an encoder actor mid-run and still finishes:
every image ends in exactly one published shard or one error row, and no shard is ever half there."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
import pytest
from helpers import image

from raycap import feature_store as fstore
from raycap.features import ExtractConfig, ExtractResult, extract_features
from raycap.models.encoder_config import EncoderConfig

if TYPE_CHECKING:
    from conftest import MultiNode

pytestmark = pytest.mark.slow

IMAGES = 320
BROKEN = 4  # files named .jpg that are not images: error rows
SPLIT = "images"
ENCODER_TITLE = "ray::MapWorker(MapBatches(FeatureEncoder))"


def _published(out: Path) -> list[Path]:
    """Every file a listing of the split's shard folders shows (temporary files are dot-named)."""
    folders = (Path(fstore.features_dir(str(out), SPLIT)), Path(fstore.errors_dir(str(out), SPLIT)))
    return sorted(p for folder in folders if folder.exists() for p in folder.iterdir() if p.suffix == ".parquet")


@pytest.mark.timeout(480)
def test_losing_an_encoders_node_mid_run_leaves_every_image_in_one_whole_shard(
    cluster: MultiNode, figures: Callable[..., None], tmp_path: Path
) -> None:
    source, out = tmp_path / "photos", tmp_path / "features"
    source.mkdir()
    for i in range(IMAGES):
        (source / f"p{i:04d}.jpg").write_bytes(image(i))
    for i in range(BROKEN):
        (source / f"broken{i}.jpg").write_bytes(b"not a jpeg")
    cfg = ExtractConfig(
        out=str(out), images=str(source), encoder=EncoderConfig("resnet18", "none", grid=3, image_size=64),
        num_encoders=2, encoder_cpus=1.0, torch_threads=1, batch_size=8, decode_batch_size=8, rows_per_shard=16,
    )  # fmt: skip
    outcome: dict[str, ExtractResult | BaseException] = {}

    def run() -> None:
        try:
            outcome["result"] = extract_features(cfg)
        except BaseException as exc:  # reported by the assertion below
            outcome["result"] = exc

    runner = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    runner.start()
    # Mid-run: shards are being published and an encoder actor runs on a worker node.
    victim = None
    while runner.is_alive() and time.monotonic() - started < 300:
        holding = {name: n for name, n in cluster.holding(ENCODER_TITLE).items() if n and name != "head"}
        if holding and len(_published(out)) >= 2:
            victim = max(holding, key=holding.__getitem__)
            break
        time.sleep(0.1)
    assert victim is not None, f"no shard published while an encoder ran on a worker node: {outcome}"
    node_id = cluster.nodes[victim].node_id
    before = len(_published(out))
    killed = cluster.kill(victim)
    dead = cluster.wait_dead(node_id)
    resumed = None
    while runner.is_alive():
        if resumed is None and len(_published(out)) > before:
            resumed = time.monotonic()
        time.sleep(0.1)
    finished = time.monotonic()
    runner.join()
    result = outcome.get("result")
    assert isinstance(result, ExtractResult), f"extraction did not finish after the node loss: {result!r}"

    shards = _published(out)
    rows = {path: pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist() for path in shards}
    ids = Counter(i for found in rows.values() for i in found)
    expected = IMAGES + BROKEN
    summary = result.splits[SPLIT]
    leftovers = [p.name for p in out.rglob(".*.tmp")]
    figures(
        "extraction",
        f"{victim} (holding an encoder actor) {killed - started:.1f} s in, after {before} shards",
        f"{expected} images in exactly one shard ({IMAGES} ok + {BROKEN} error rows)",
        f"{summary.ok} ok + {summary.failed} error rows in {len(shards)} shards, "
        f"{sum(n > 1 for n in ids.values())} duplicated, {summary.pending} pending, {len(leftovers)} temp files left",
        f"{expected - len(ids)} rows",
        f"node marked dead {dead - killed:.1f} s after the kill, next shard {(resumed or finished) - killed:.1f} s, "
        f"job done {finished - killed:.1f} s after it",
    )
    assert all(n == 1 for n in ids.values()), {i: n for i, n in ids.items() if n > 1}
    assert len(ids) == expected and summary.pending == 0
    assert (summary.ok, summary.failed) == (IMAGES, BROKEN)
    # No half shard: every listed file read whole above, and a rerun finds nothing left to do.
    assert extract_features(cfg).splits[SPLIT].new_ok == 0
