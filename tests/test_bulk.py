"""Bulk captioning: a bucket on the real S3 server, the repo's serve_config.yaml deployed on the
session's Ray, captions compared with the model called directly; resume after a limit without a
duplicate or a missing row (killed jobs and failing S3 reads: tests/reliability/test_fault_bulk.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import deploy_pinned, image, make_checkpoint, png_header
from ray import serve

from raycap import storage
from raycap.bulk import (
    RESULT_SCHEMA,
    BulkConfig,
    Chunk,
    ChunkWriter,
    Planner,
    Progress,
    caption_bucket,
    load_progress,
    read_batch,
    read_results,
    select,
    shard_uris,
)
from raycap.models.beam import beam_search
from raycap.models.checkpoint import load_checkpoint
from raycap.models.decoding import BEAM_SIZE
from raycap.models.encoder import Encoder
from raycap.serve_schema import InvalidOptions

MAX_LEN = 8
GOOD = 14
BAD = {  # name -> what its error row must say
    "bad/notes.txt": "not an image",
    "bad/empty.jpg": "empty file",
    "bad/truncated.jpg": "corrupt image",
    "bad/bomb.png": "image too large",
    "big/huge.jpg": "exceeds the limit",
}
MAX_IMAGE_BYTES = 20_000  # the application's limit, which the bulk job shares
MAX_BEAM_SIZE = 4


def _bad_files() -> dict[str, bytes]:
    return {
        "bad/notes.txt": b"captions go here\n",
        "bad/empty.jpg": b"",
        "bad/truncated.jpg": image(99)[:300],
        "bad/bomb.png": png_header(100_000, 100_000),
        "big/huge.jpg": image(98, size=(64, 48), fmt="BMP") + b"\0" * MAX_IMAGE_BYTES,
    }


@pytest.fixture(scope="module")
def bucket(s3_server) -> tuple[str, dict[str, bytes]]:
    """s3://bucket/photos with GOOD images in two folders and the BAD files; returns (prefix, files)."""
    files = {f"{'a' if i % 2 else 'b'}/img{i:03d}.jpg": image(i) for i in range(GOOD)} | _bad_files()
    name = s3_server.make_bucket()
    client = s3_server.client()
    for key, data in files.items():
        client.put_object(Bucket=name, Key=f"photos/{key}", Body=data)
    return f"s3://{name}/photos", files


@pytest.fixture(scope="module")
def app(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The application deployed from serve_config.yaml with a random-weight checkpoint; yields it."""
    checkpoint = str(make_checkpoint(tmp_path_factory.mktemp("bulk_ckpt"), "bulk-model", grid=3, seed=4))
    deploy_pinned(checkpoint, MAX_LEN, {"max_image_bytes": MAX_IMAGE_BYTES, "max_beam_size": MAX_BEAM_SIZE})
    try:
        yield checkpoint
    finally:
        serve.shutdown()


def _direct_captions(checkpoint: str, files: dict[str, bytes], prefix: str) -> dict[str, str]:
    """key -> caption from the checkpoint called in this process: encoder then beam search."""
    model = load_checkpoint(checkpoint)
    encoder = Encoder(model.encoder_cfg)
    vocab = model.vocab
    out = {}
    for name, data in files.items():
        if name in BAD:
            continue
        pixels, _ = encoder.preprocess(data)
        best = beam_search(model.decoder, encoder.encode(pixels[None].copy()), vocab.start_id, vocab.end_id,
                           beam_size=BEAM_SIZE, max_len=MAX_LEN, banned=(vocab.unk_id,))[0][0]  # fmt: skip
        out[f"{prefix}/{name}"] = vocab.decode_text(best.tokens)
    return out


def _config(source: str, out: str, **kwargs) -> BulkConfig:
    """Chunks of 6 files, windows of at least 8: the 19 files take 2 Ray Data passes."""
    return BulkConfig(source=source, out=out, clients=1, in_flight=8, read_batch_size=4, rows_per_shard=6, window=8,
                      **kwargs)  # fmt: skip


def _assert_exactly_once(results: pa.Table, files: dict[str, bytes], prefix: str) -> None:
    keys = results.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "a key has more than one row"
    assert set(keys) == {f"{prefix}/{name}" for name in files}


# --- no Ray --------------------------------------------------------------------------------------


def test_select_includes_then_excludes_with_globs_across_folders() -> None:
    keys = ["a/x.jpg", "a/y.png", "b/z.jpg", "notes.txt"]
    assert select(keys, (), ()) == [True] * 4
    assert select(keys, ("*.jpg",), ()) == [True, False, True, False]
    assert select(keys, ("*.jpg", "*.png"), ("b/*",)) == [True, True, False, False]


def test_planning_leaves_out_results_written_inside_the_source(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(image(1))
    (tmp_path / "captions" / "results").mkdir(parents=True)
    (tmp_path / "captions" / "results" / "part-x.parquet").write_bytes(b"rows")
    planner = Planner(BulkConfig(source=str(tmp_path), out=str(tmp_path / "captions")))
    (chunk,) = planner.chunks(storage.list_pages(str(tmp_path)))
    assert (planner.listed, planner.matched) == (2, 1) and [f.uri for f in chunk.todo] == [str(tmp_path / "a.jpg")]


def test_config_rejects_unknown_format_and_empty_sizes() -> None:
    with pytest.raises(ValueError, match="format"):
        BulkConfig(source="s", out="o", format="csv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 1"):
        BulkConfig(source="s", out="o", in_flight=0)


def test_read_batch_gives_each_bad_file_its_reason_and_decodes_the_rest(tmp_path: Path) -> None:
    files = {"good.jpg": image(1), **_bad_files()}
    keys, sizes = [], []
    for name, data in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        keys.append(str(path))
        sizes.append(len(data))
    keys.append(str(tmp_path / "gone.jpg"))  # listed, then deleted before the read
    sizes.append(10)
    batch = {"key": np.array(keys, dtype=object), "size": np.array(sizes)}
    out = read_batch(batch, image_size=32, max_image_bytes=MAX_IMAGE_BYTES, max_pixels=10**7, retries=1)
    assert out["image"].shape == (len(keys), 32, 32, 3) and out["error"][0] == ""
    assert out["image"][0].any()
    for (name, reason), error in zip(BAD.items(), out["error"][1:-1]):
        assert reason in error, (name, error)
    assert "could not read" in out["error"][-1]


def test_chunk_writer_commits_chunks_in_listing_order_and_takes_a_key_once(tmp_path: Path) -> None:
    cfg = BulkConfig(source="src", out=str(tmp_path), format="jsonl")
    progress = Progress("src", [], [])
    writer = ChunkWriter(cfg, progress, {})

    def rows(keys: list[str]) -> pa.Table:
        n = len(keys)
        return pa.table({"key": keys, "caption": ["c"] * n, "score": [-1.0] * n, "model": ["m"] * n,
                         "status": ["ok"] * n, "error": [None] * n}, schema=RESULT_SCHEMA)  # fmt: skip

    def chunk(*keys: str) -> Chunk:
        return Chunk(last=keys[-1], listed=len(keys), todo=[storage.FileInfo(k, 1) for k in keys])

    writer.open([chunk("k1", "k2"), chunk("k3", "k4"), chunk("k5")])
    writer.add(rows(["k3", "k4", "k5", "k1"]))  # chunks 2 and 3 complete, but wait for chunk 1
    assert shard_uris(str(tmp_path)) == [] and load_progress(cfg).watermark is None
    writer.add(rows(["k3", "k2"]))  # k3 again, as from a retried upstream task
    assert len(shard_uris(str(tmp_path))) == 3
    writer.close()
    assert sorted(read_results(str(tmp_path)).column("key").to_pylist()) == ["k1", "k2", "k3", "k4", "k5"]
    assert (writer.ok, writer.failed) == (5, 0)
    record = load_progress(cfg)
    assert (record.watermark, record.listed, record.matched, record.ok, record.shards) == ("k5", 5, 5, 5, 3)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


# --- Ray, Serve and S3 ---------------------------------------------------------------------------


@pytest.mark.integration
def test_every_good_key_gets_the_direct_caption_and_every_bad_key_an_error_row(
    app: str, bucket: tuple[str, dict[str, bytes]], s3_server
) -> None:
    prefix, files = bucket
    out = f"s3://{s3_server.make_bucket()}/captions"
    summary = caption_bucket(_config(prefix, out, checkpoint=app))
    results = read_results(out)
    _assert_exactly_once(results, files, prefix)
    rows = {r["key"]: r for r in results.to_pylist()}
    expected = _direct_captions(app, files, prefix)
    for key, caption in expected.items():
        assert rows[key]["status"] == "ok" and rows[key]["error"] is None
        assert rows[key]["caption"] == caption and rows[key]["model"] == "bulk-model"
        assert rows[key]["score"] < 0
    for name, reason in BAD.items():
        row = rows[f"{prefix}/{name}"]
        assert row["status"] == "error" and reason in row["error"] and row["caption"] is None
    assert (summary.new_ok, summary.new_failed, summary.total_ok, summary.pending) == (GOOD, len(BAD), GOOD, 0)
    assert summary.checkpoint == app and summary.shards == 4  # chunks of 6, 6, 6 and 1 file
    written = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert written["total_failed"] == len(BAD) and written["images_per_s"] > 0


@pytest.mark.integration
def test_limit_then_rerun_gives_exactly_one_row_per_key_in_jsonl(
    app: str, bucket: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    prefix, files = bucket
    out = str(tmp_path / "captions")
    first = caption_bucket(_config(prefix, out, limit=7, format="jsonl"))
    assert first.new_ok + first.new_failed == 7 and first.pending == len(files) - 7
    dry = caption_bucket(_config(prefix, out, dry_run=True))
    assert (dry.already_done, dry.todo) == (7, len(files) - 7)
    second = caption_bucket(_config(prefix, out, format="jsonl"))
    assert second.already_done == 7 and second.new_ok + second.new_failed == len(files) - 7
    _assert_exactly_once(read_results(out), files, prefix)
    assert all(uri.endswith(".jsonl") for uri in shard_uris(out))
    third = caption_bucket(_config(prefix, out))
    assert third.todo == 0 and third.shards == 0


@pytest.mark.integration
def test_filters_and_dry_run_count_without_writing(bucket: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    prefix, files = bucket
    out = tmp_path / "dry"
    summary = caption_bucket(_config(prefix, str(out), include=("a/*", "bad/*"), exclude=("*.txt",), dry_run=True))
    expected = sum(1 for n in files if n.startswith(("a/", "bad/")) and not n.endswith(".txt"))
    assert (summary.listed, summary.matched, summary.todo) == (len(files), expected, expected)
    assert not out.exists()


@pytest.mark.integration
def test_beam_size_over_the_apps_limit_is_refused_before_any_caption(
    app: str, bucket: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    prefix, _ = bucket
    out = tmp_path / "wide"
    wide = MAX_BEAM_SIZE + 1
    with pytest.raises(InvalidOptions, match=f"beam_size must be between 1 and {MAX_BEAM_SIZE}, got {wide}"):
        caption_bucket(_config(prefix, str(out), beam_size=wide))
    assert not out.exists()


@pytest.mark.integration
def test_running_app_with_another_checkpoint_is_refused(app: str, tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path, "other", grid=3, seed=9)
    with pytest.raises(ValueError, match="already serves"):
        caption_bucket(_config(str(tmp_path / "other"), str(tmp_path / "o"), checkpoint=str(other)))
