"""Bulk captioning in bounded memory: the listing streams page by page in listing order (a local walk
and the real S3 server), the planner cuts it into chunks and windows as it goes, and a rerun after a
kill lists only after the watermark and counts the shard the kill left unrecorded, without
captioning its files again. bench/bulk_listing.py runs at tiny sizes. No Ray: a function that makes
rows stands in for the Ray Data pipeline (the pipeline itself: tests/test_bulk.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
from helpers import REPO

from raycap import bulk, storage
from raycap.bulk import RESULT_SCHEMA, BulkConfig, ChunkWriter, Planner, Progress, read_results
from raycap.storage import FileInfo


def _ok_rows(files: Sequence[FileInfo]) -> pa.Table:
    n = len(files)
    return pa.table({"key": [f.uri for f in files], "caption": ["c"] * n, "score": [-1.0] * n, "model": ["m"] * n,
                     "status": ["ok"] * n, "error": [None] * n}, schema=RESULT_SCHEMA)  # fmt: skip


def test_local_pages_stream_in_byte_order_and_start_after_a_uri(tmp_path: Path) -> None:
    names = ["a.b", "a/x", "a/y/z", "a-c", "a0", "b", "é", "A"]
    for name in names:
        storage.write_bytes(str(tmp_path / name), name.encode())
    pages = list(storage.list_pages(str(tmp_path), page_size=3))
    uris = [f.uri for page in pages for f in page]
    assert [len(page) for page in pages] == [3, 3, 2]
    assert uris == sorted(str(tmp_path / name) for name in names)  # S3's order: "a.b" before "a/x"
    assert pages[0][0] == FileInfo(str(tmp_path / "A"), 1)
    after = [f.uri for page in storage.list_pages(str(tmp_path), start_after=str(tmp_path / "a/x")) for f in page]
    assert after == uris[uris.index(str(tmp_path / "a/x")) + 1 :]


@pytest.mark.integration
def test_s3_pages_stream_in_order_and_start_after_a_key(s3_server) -> None:
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    keys = [f"photos/{i // 10}/{i:03d} x+y.jpg" for i in range(25)]  # a space and a '+': URL-encoded in listings
    for i, key in enumerate(keys):
        client.put_object(Bucket=bucket, Key=key, Body=b"x" * i)
    client.put_object(Bucket=bucket, Key="photos/marker/", Body=b"")  # a folder marker, not a file
    client.put_object(Bucket=bucket, Key="photos2/beside.jpg", Body=b"x")  # not under the prefix
    prefix = f"s3://{bucket}/photos"
    pages = list(storage.list_pages(prefix, page_size=10))
    assert [len(page) for page in pages] == [10, 10, 5]
    assert [f for page in pages for f in page] == [FileInfo(f"s3://{bucket}/{key}", i) for i, key in enumerate(keys)]
    after = [f.uri for page in storage.list_pages(prefix, start_after=f"s3://{bucket}/{keys[12]}") for f in page]
    assert after == [f"s3://{bucket}/{key}" for key in keys[13:]]


def test_planner_cuts_chunks_in_listing_order_and_only_counts_past_the_limit() -> None:
    names = ["a.jpg", "b.txt", "c.jpg", "d.jpg", "e-out/results/p.jpg", "e.jpg", "f.jpg", "g.jpg", "h.jpg", "i.jpg"]
    files = [FileInfo(f"s3://b/src/{name}", 1) for name in names]
    cfg = BulkConfig(source="s3://b/src", out="s3://b/src/e-out", include=("*.jpg",), rows_per_shard=2, window=3,
                     limit=5)  # fmt: skip
    planner = Planner(cfg, adopted={"s3://b/src/c.jpg"})  # c.jpg has a row in an uncounted shard
    windows = list(planner.windows(iter([files[:4], files[4:]])))

    def names_of(uris: list[str]) -> list[str]:
        return [uri.rsplit("/", 1)[-1] for uri in uris]

    chunks = [chunk for window in windows for chunk in window]
    assert [len(window) for window in windows] == [2, 1]  # 3 files to caption, then the rest
    assert [names_of([f.uri for f in chunk.todo]) for chunk in chunks] == [["a.jpg"], ["d.jpg", "e.jpg"],
                                                                           ["f.jpg", "g.jpg"]]  # fmt: skip
    assert [names_of(chunk.adopted) for chunk in chunks] == [["c.jpg"], [], []]
    assert [(names_of([chunk.last])[0], chunk.listed) for chunk in chunks] == [("c.jpg", 3), ("e.jpg", 3), ("g.jpg", 2)]
    # h.jpg and i.jpg, past --limit, are counted but in no chunk; results under out never match.
    assert (planner.listed, planner.matched, planner.todo) == (10, 8, 5)


class Killed(Exception):
    """Stands in for a SIGKILL between a shard's write and the record's."""


def _caption(files: list[FileInfo], captioned: list[str]) -> Iterator[pa.Table]:
    """Stands in for the Ray Data pipeline: an ok row per file, in batches of 3 from the window's end."""
    captioned.extend(f.uri for f in files)
    for end in range(len(files), 0, -3):
        yield _ok_rows(files[max(0, end - 3) : end])


@pytest.mark.integration
def test_a_rerun_lists_only_after_the_watermark_and_counts_the_shard_a_kill_left_unrecorded(
    s3_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    uris = [f"s3://{bucket}/photos/{i:03d}.jpg" for i in range(30)]
    for uri in uris:
        client.put_object(Bucket=bucket, Key=uri.split("/", 3)[-1], Body=b"x")
    cfg = BulkConfig(source=f"s3://{bucket}/photos", out=f"s3://{bucket}/captions", rows_per_shard=4, window=8)
    captioned: list[str] = []

    save = bulk.save_progress

    def killed_after_the_fourth_shard(out: str, progress: Progress) -> None:
        if progress.shards == 4:
            raise Killed
        save(out, progress)

    monkeypatch.setattr(bulk, "save_progress", killed_after_the_fourth_shard)
    run = bulk.plan(cfg)
    writer = ChunkWriter(cfg, run.progress, run.uncounted)
    with pytest.raises(Killed):
        bulk.caption_windows(run.windows, writer, lambda f: _caption(f, captioned))
    monkeypatch.setattr(bulk, "save_progress", save)
    record = bulk.load_progress(cfg)
    assert (record.watermark, record.matched, record.shards) == (uris[11], 12, 3)
    assert read_results(cfg.out).num_rows == 16  # the 4th shard is written, not recorded

    starts: list[str | None] = []

    def pages(source: str, start_after: str | None) -> Iterator[list[FileInfo]]:
        starts.append(start_after)
        return storage.list_pages(source, start_after)

    captioned.clear()
    run = bulk.plan(cfg, pages)
    assert sorted(run.uncounted) == uris[12:16]  # read from the unrecorded shard: one chunk
    writer = ChunkWriter(cfg, run.progress, run.uncounted)
    bulk.caption_windows(run.windows, writer, lambda f: _caption(f, captioned))
    assert starts == [uris[11]] and run.planner.listed == 18  # only the files after the watermark
    assert sorted(captioned) == uris[16:] and (writer.ok, writer.shards) == (14, 4)
    keys = Counter(read_results(cfg.out).column("key").to_pylist())
    assert sorted(keys) == uris and set(keys.values()) == {1}
    final = bulk.load_progress(cfg)
    assert (final.watermark, final.listed, final.matched, final.ok, final.orphans) == (uris[-1], 30, 30, 30, [])


def test_a_rerun_with_other_filters_or_into_results_without_a_record_is_refused(tmp_path: Path) -> None:
    cfg = BulkConfig(source=str(tmp_path / "src"), out=str(tmp_path / "out"))
    bulk.save_progress(cfg.out, Progress(cfg.source, [], []))
    with pytest.raises(ValueError, match=r"--include \[\] --exclude \[\]: a rerun resumes only the same listing"):
        bulk.load_progress(replace(cfg, include=("*.jpg",)))
    storage.write_bytes(str(tmp_path / "old" / "results" / "part-1.parquet"), b"rows")
    with pytest.raises(ValueError, match="holds results/ but no progress.json"):
        bulk.load_progress(replace(cfg, out=str(tmp_path / "old")))


@pytest.mark.integration
def test_bench_bulk_listing_at_tiny_sizes_prints_its_figures() -> None:
    # Its own SeaweedFS, as a user runs it; 300 real objects, then 20k and 50k keys of the paged source.
    done = subprocess.run([sys.executable, "bench/bulk_listing.py", "--real", "300", "--fake", "20000", "50000"],
                          cwd=REPO, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["keys_real"] == 300 and figures["keys_per_s_real"] > 0 and figures["setup_s"] > 0
    for key in ("rss_mb_real", "rss_mb_20k", "rss_mb_50k", "rss_mb_resume_50k"):
        assert figures[key] > 0, key
    assert figures["ratio"] == pytest.approx(figures["rss_mb_50k"] / figures["rss_mb_20k"], abs=0.01)
    assert figures["resume_listed_50k"] == 50_000 - figures["resume_watermark_at_50k"]  # only after the watermark
