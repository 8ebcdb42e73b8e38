"""Feature extraction: batch functions, the stored grid and Parquet layout (no Ray), then the Ray Data
stage end to end on a small synthetic COCO set, locally and through the session's S3 server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from helpers import png_header
from PIL import Image

from raycap import feature_store as fstore
from raycap import storage
from raycap.data.coco import ImageRecord
from raycap.data.images import load_image
from raycap.data.synthetic import SyntheticSet, generate
from raycap.feature_batches import FeatureEncoder, decode_batch
from raycap.feature_store import FeatureSpec
from raycap.features import (
    ExtractConfig,
    extract_features,
    image_id_for_key,
    list_image_records,
    prepare_vocab,
)
from raycap.models.encoder import Encoder, pool_to_grid
from raycap.models.encoder_config import EncoderConfig

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL = 16, 8
SIZE, NATIVE, GRID = 64, 2, 4  # resnet18 at 64x64 gives 2x2 features; the decoder's grid is 4x4


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSet:
    return generate(tmp_path_factory.mktemp("coco"), n_train=N_TRAIN, n_val=N_VAL, seed=0)


@pytest.fixture(scope="module")
def encoder_cfg(tmp_path_factory: pytest.TempPathFactory) -> EncoderConfig:
    """A small resnet18 with seeded random weights saved to a file, so every process builds the same net."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return EncoderConfig("resnet18", str(path), grid=GRID, image_size=SIZE)


@pytest.fixture(scope="module")
def encoder(encoder_cfg: EncoderConfig) -> Encoder:
    return Encoder(encoder_cfg)


def _config(out: str, encoder_cfg: EncoderConfig, **kwargs: Any) -> ExtractConfig:
    """Small batches and shards, so that even 24 images span several of each."""
    defaults = dict(out=out, encoder=encoder_cfg, batch_size=8, decode_batch_size=4, rows_per_shard=6)
    return ExtractConfig(**{**defaults, **kwargs})


def _jpeg(mode: str, colour: int | tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (40, 30), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _bad_and_odd_files(synthetic: SyntheticSet) -> tuple[dict[str, bytes], dict[str, str], dict[str, str]]:
    """Files to extract, the error each bad one must give, and the mode each odd one converts from."""
    good = sorted((synthetic.root / "train2017").glob("*.jpg"))[:3]
    rgba = io.BytesIO()
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(rgba, format="PNG")
    whole = good[0].read_bytes()
    files = {f"good/{p.name}": p.read_bytes() for p in good}
    files |= {
        "bad/empty.jpg": b"",
        "bad/notes.jpg": b"these are notes, not a photo\n",
        "bad/truncated.jpg": whole[: len(whole) // 2],
        "bad/bomb.png": png_header(100_000, 100_000),
        "odd/grey.jpg": _jpeg("L", 128),
        "odd/cmyk.jpg": _jpeg("CMYK", (0, 255, 255, 0)),
        "odd/rgba.png": rgba.getvalue(),
    }
    errors = {
        "bad/empty.jpg": "empty",
        "bad/notes.jpg": "not an image",
        "bad/truncated.jpg": "corrupt",
        "bad/bomb.png": "too large",
    }
    converted = {"odd/grey.jpg": "L", "odd/cmyk.jpg": "CMYK", "odd/rgba.png": "RGBA"}
    return files, errors, converted


def _write_local(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _upload(bucket: str, prefix: str, root: Path) -> None:
    client = storage.s3_client()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root)}", Body=path.read_bytes())


def _assert_features_match_encoder(out: str, split: str, encoder: Encoder, keys: dict[int, str]) -> None:
    ids, features = fstore.read_features(out, split)  # (N,), (N, P, C) float16
    assert features.dtype == np.float16 and features.shape == (len(keys), NATIVE * NATIVE, 512)
    assert ids.tolist() == sorted(keys)
    for row in (0, len(ids) - 1):
        image, _ = load_image(storage.read_bytes(keys[int(ids[row])]), SIZE)
        expected = encoder.encode(image[None].copy()).numpy()[0]  # (P, C) float32; copy: decoded images are read-only
        np.testing.assert_allclose(features[row].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


# --- no Ray -----------------------------------------------------------------------------------


def test_image_id_for_key_is_stable_int63_and_distinct() -> None:
    keys = [f"dir/{i:05d}.jpg" for i in range(2000)]
    ids = [image_id_for_key(key) for key in keys]
    assert ids == [image_id_for_key(key) for key in keys]
    assert len(set(ids)) == len(ids)
    assert all(0 <= i < 2**63 for i in ids)


def test_list_image_records_ids_ignore_where_the_folder_lives(tmp_path: Path) -> None:
    _write_local(tmp_path / "a", {"x/1.jpg": b"", "2.PNG": b"", "readme.txt": b""})
    _write_local(tmp_path / "b", {"x/1.jpg": b"", "2.PNG": b""})
    a, b = list_image_records(str(tmp_path / "a"), "images"), list_image_records(str(tmp_path / "b"), "images")
    assert [r.path for r in a] == [str(tmp_path / "a" / "2.PNG"), str(tmp_path / "a" / "x" / "1.jpg")]
    assert [r.image_id for r in a] == [r.image_id for r in b] == [image_id_for_key("2.PNG"), image_id_for_key("x/1.jpg")]


def test_decode_batch_gives_reasons_for_bad_files_and_modes_for_converted(
    synthetic: SyntheticSet, tmp_path: Path
) -> None:
    files, errors, converted = _bad_and_odd_files(synthetic)
    _write_local(tmp_path, files)
    names = [*files, "bad/missing.jpg"]
    batch = {"image_id": np.arange(len(names)), "key": np.array([str(tmp_path / n) for n in names], dtype=object)}
    out = decode_batch(batch, image_size=SIZE, max_pixels=10_000_000)
    assert out["image"].shape == (len(names), SIZE, SIZE, 3) and out["image"].dtype == np.uint8
    reasons = dict(zip(names, out["error"]))
    for name, fragment in {**errors, "bad/missing.jpg": "could not read"}.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert dict(zip(names, out["converted_from"])) == {name: converted.get(name, "") for name in names}
    good = [i for i, name in enumerate(names) if name.startswith("good/")]
    assert all(out["error"][i] == "" and out["width"][i] > 0 for i in good)


def test_feature_encoder_encodes_good_rows_and_zeroes_failed(synthetic: SyntheticSet, encoder: Encoder) -> None:
    keys = [str(p) for p in sorted((synthetic.root / "val2017").glob("*.jpg"))[:3]]
    batch = decode_batch({"key": np.array(keys, dtype=object)}, SIZE, 10_000_000)
    batch["error"][1] = "broken"
    out = FeatureEncoder(FeatureSpec(encoder.cfg))(batch)
    assert "image" not in out and out["features"].shape == (3, NATIVE * NATIVE, 512)
    assert out["features"].dtype == np.float16 and not out["features"][1].any()
    expected = encoder.encode(batch["image"][[0, 2]]).numpy()
    np.testing.assert_allclose(out["features"][[0, 2]].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_feature_encoder_stores_features_pooled_to_a_stored_grid(synthetic: SyntheticSet, encoder: Encoder) -> None:
    keys = [str(p) for p in sorted((synthetic.root / "val2017").glob("*.jpg"))[:2]]
    batch = decode_batch({"key": np.array(keys, dtype=object)}, SIZE, 10_000_000)
    out = FeatureEncoder(FeatureSpec(encoder.cfg, stored_grid=GRID))(batch)
    assert out["features"].shape == (2, GRID * GRID, 512) and out["features"].dtype == np.float16
    expected = pool_to_grid(encoder.encode(batch["image"]), GRID).numpy()  # pooled in float32, then stored
    np.testing.assert_allclose(out["features"].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_reference_features_are_stored_at_resnet101s_native_8x8_a_third_of_the_pooled_bytes() -> None:
    native, pooled = FeatureSpec(EncoderConfig()), FeatureSpec(EncoderConfig(), stored_grid=14)
    assert (native.stored_grid, native.shape, pooled.shape) == (8, (64, 2048), (196, 2048))
    itemsize = np.dtype(native.dtype).itemsize
    native_bytes, pooled_bytes = np.prod(native.shape) * itemsize, np.prod(pooled.shape) * itemsize
    assert (native_bytes, pooled_bytes) == (262_144, 802_816) and 3 * native_bytes <= pooled_bytes
    assert native.describe() == (
        "8x8x2048 float16, the native grid of resnet101 at 256x256, upsampled to 14x14 by the decoder"
    )
    assert pooled.describe() == (
        "14x14x2048 float16, upsampled from the 8x8 grid of resnet101 at 256x256, used as stored"
    )
    lite0 = FeatureSpec(EncoderConfig("efficientnet_lite0", grid=7, image_size=224))
    assert lite0.shape == (49, 1280) and lite0.describe().endswith("used as stored")


def test_spec_without_a_stored_grid_means_the_native_one() -> None:
    cfg = EncoderConfig("resnet18", "none", grid=GRID, image_size=SIZE)
    assert FeatureSpec(cfg) == FeatureSpec(cfg, stored_grid=NATIVE) != FeatureSpec(cfg, stored_grid=GRID)
    with pytest.raises(ValueError, match="stored_grid must be >= 1"):
        FeatureSpec(cfg, stored_grid=0)


def test_shard_written_before_native_storage_reads_as_pooled_to_the_encoders_grid(tmp_path: Path) -> None:
    """Old shards' metadata has no stored_grid: their features were pooled to encoder.grid."""
    cfg = EncoderConfig("resnet18", "none", grid=GRID, image_size=SIZE)
    spec = FeatureSpec(cfg, stored_grid=GRID)
    features = np.random.default_rng(0).standard_normal((2, GRID * GRID, 512)).astype(np.float16)
    table = fstore.features_table(spec, np.array([1, 2]), ["a", "b"], np.ones(2), np.ones(2), [None, None], features)
    old = {"encoder": {"arch": "resnet18", "weights": "none", "grid": GRID, "image_size": SIZE}, "dtype": "float16",
           "shape": [GRID * GRID, 512]}  # fmt: skip
    table = table.replace_schema_metadata({fstore.METADATA_KEY: json.dumps(old)})
    fstore.write_table(table, storage.join(fstore.features_dir(str(tmp_path), "val"), "part-old.parquet"))
    assert fstore.stored_spec(str(tmp_path), "val") == spec
    ids, read = fstore.read_features(str(tmp_path), "val")
    assert ids.tolist() == [1, 2]
    np.testing.assert_array_equal(read, features)


def test_feature_shard_round_trips_with_spec_and_zero_copy_view(tmp_path: Path) -> None:
    spec = FeatureSpec(EncoderConfig("resnet18", "none", grid=2, image_size=64))
    features = np.random.default_rng(0).standard_normal((3, 4, 512)).astype(np.float16)
    table = fstore.features_table(
        spec, np.array([7, 3, 5]), ["a", "b", "c"], np.array([1, 2, 3]), np.array([4, 5, 6]), [None, "L", None], features
    )
    uri = str(tmp_path / "part-0.parquet")
    size = fstore.write_table(table, uri)
    assert size == Path(uri).stat().st_size
    ids, read, read_spec = fstore.read_feature_shard(uri)
    assert read_spec == spec and ids.tolist() == [7, 3, 5]
    np.testing.assert_array_equal(read, features)
    assert not read.flags.owndata  # a view into the Arrow buffer
    with pytest.raises(ValueError, match="expected"):
        fstore.features_table(spec, np.array([1]), ["a"], np.array([1]), np.array([1]), [None], features[:1, :3])


def test_split_state_counts_published_shards_and_ignores_temp_files(tmp_path: Path) -> None:
    out = str(tmp_path)
    spec = FeatureSpec(EncoderConfig("resnet18", "none", grid=1, image_size=64), dtype="float32", stored_grid=1)
    table = fstore.features_table(
        spec, np.array([1, 2]), ["a", "b"], np.ones(2), np.ones(2), ["CMYK", None], np.zeros((2, 1, 512))
    )
    fstore.write_table(table, storage.join(fstore.features_dir(out, "val"), "part-a.parquet"))
    errors = fstore.errors_table(["c"], np.array([3]), ["empty"])
    fstore.write_table(errors, storage.join(fstore.errors_dir(out, "val"), "part-a.parquet"))
    # What a crash mid-write leaves behind: a temp file, never a .parquet name.
    (Path(fstore.features_dir(out, "val")) / ".part-b.parquet.1a2b.tmp").write_bytes(b"PAR1 half")
    state = fstore.split_state(out, "val")
    assert state.feature_ids.tolist() == [1, 2] and state.error_ids.tolist() == [3]
    assert state.converted == 1 and state.done_ids == {1, 2, 3}
    assert fstore.read_errors(out, "val") == [{"key": "c", "image_id": 3, "reason": "empty"}]
    assert fstore.stored_spec(out, "val") == spec
    assert fstore.split_state(out, "train").done_ids == set()


def test_vocab_comes_from_train_captions_only_and_is_reused(tmp_path: Path) -> None:
    def record(image_id: int, split: str, caption: str) -> ImageRecord:
        return ImageRecord(image_id, f"{image_id}.jpg", 1, 1, (caption,), split)

    records = {"train": [record(1, "train", "a red circle")], "val": [record(2, "val", "a zebra")]}
    cfg = ExtractConfig(out=str(tmp_path), coco_root=str(tmp_path), min_freq=1)
    vocab = prepare_vocab(cfg, records)
    assert "circle" in vocab.stoi and "zebra" not in vocab.stoi
    records["train"] = [record(1, "train", "a blue square")]
    assert prepare_vocab(cfg, records) == vocab  # the saved vocab.json wins


def test_config_needs_exactly_one_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one input"):
        ExtractConfig(out=str(tmp_path))
    with pytest.raises(ValueError, match="exactly one input"):
        ExtractConfig(out=str(tmp_path), coco_root="a", images="b")
    with pytest.raises(ValueError, match="dtype"):
        ExtractConfig(out=str(tmp_path), images="b", dtype="int8")


def test_job_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "extract_features.py"), "--help"], capture_output=True, text=True, check=True
    )
    assert "--coco-root" in result.stdout and "--images" in result.stdout


# --- Ray (and S3) ----------------------------------------------------------------------------


@pytest.mark.integration
def test_extract_local_coco_writes_features_captions_and_manifest(
    ray_session: None, synthetic: SyntheticSet, encoder: Encoder, tmp_path: Path
) -> None:
    out = str(tmp_path / "out")
    result = extract_features(_config(out, encoder.cfg, coco_root=str(synthetic.root)))
    assert {split: (s.images, s.ok, s.new_ok, s.failed, s.pending) for split, s in result.splits.items()} == {
        "train": (N_TRAIN, N_TRAIN, N_TRAIN, 0, 0),
        "val": (N_VAL, N_VAL, N_VAL, 0, 0),
    }
    keys = {i: str(synthetic.root / "val2017" / f"{i:012d}.jpg") for i in range(N_TRAIN + 1, N_TRAIN + N_VAL + 1)}
    _assert_features_match_encoder(out, "val", encoder, keys)
    assert dict(zip(*fstore.read_keys(out, "val"))) == keys
    references = fstore.read_references(out, "train")
    assert sorted(references) == list(range(1, N_TRAIN + 1)) and all(len(r) == 5 for r in references.values())
    captions = fstore.read_captions(out, "train")
    vocab = fstore.read_vocab(out)
    assert captions.tokens.shape == (N_TRAIN * 5, vocab.max_words + 2) and captions.tokens.dtype == np.int32
    np.testing.assert_array_equal(captions.tokens, vocab.encode_batch(captions.texts))
    assert sorted(set(captions.image_ids.tolist())) == list(range(1, N_TRAIN + 1))
    manifest = fstore.read_manifest(out)
    assert manifest["features"]["shape"] == [NATIVE * NATIVE, 512] and manifest["features"]["dtype"] == "float16"
    assert manifest["features"]["stored_grid"] == NATIVE and result.spec.describe() == manifest["features"]["description"]
    assert "the native grid of resnet18 at 64x64, upsampled to 4x4 by the decoder" in result.spec.describe()
    assert manifest["splits"]["train"]["bytes_per_image"] > 0 and manifest["vocab_size"] == len(vocab)


@pytest.mark.integration
def test_rerun_encodes_only_what_is_missing(
    ray_session: None, synthetic: SyntheticSet, encoder_cfg: EncoderConfig, tmp_path: Path
) -> None:
    cfg = _config(str(tmp_path / "out"), encoder_cfg, coco_root=str(synthetic.root))
    first = extract_features(replace(cfg, limit=5))  # an interrupted run
    assert [(s.new_ok, s.pending) for s in first.splits.values()] == [(5, N_TRAIN - 5), (5, N_VAL - 5)]
    second = extract_features(cfg)
    assert [(s.new_ok, s.ok, s.pending) for s in second.splits.values()] == [
        (N_TRAIN - 5, N_TRAIN, 0),
        (N_VAL - 5, N_VAL, 0),
    ]

    lost = fstore.list_shards(fstore.features_dir(cfg.out, "train"))[-1].uri  # a shard lost to a crash
    lost_ids = fstore.read_feature_shard(lost)[0]
    Path(lost).unlink()
    third = extract_features(cfg)
    assert (third.splits["train"].new_ok, third.splits["val"].new_ok) == (len(lost_ids), 0)
    assert fstore.read_features(cfg.out, "train")[0].tolist() == list(range(1, N_TRAIN + 1))
    assert all(s.new_ok == 0 for s in extract_features(cfg).splits.values())

    with pytest.raises(ValueError, match="another --out"):
        extract_features(replace(cfg, encoder=replace(encoder_cfg, grid=2)))
    with pytest.raises(ValueError, match=f"--stored-grid {NATIVE} to go on"):
        extract_features(replace(cfg, stored_grid=GRID))


@pytest.mark.integration
def test_extract_s3_coco_to_s3(
    ray_session: None, s3_server, synthetic: SyntheticSet, encoder: Encoder
) -> None:
    bucket = s3_server.make_bucket()
    _upload(bucket, "coco", synthetic.root)
    out = f"s3://{bucket}/features-run"
    result = extract_features(_config(out, encoder.cfg, coco_root=f"s3://{bucket}/coco", splits=("val",)))
    assert (result.splits["val"].ok, result.splits["val"].failed) == (N_VAL, 0)
    keys = {i: f"s3://{bucket}/coco/val2017/{i:012d}.jpg" for i in range(N_TRAIN + 1, N_TRAIN + N_VAL + 1)}
    _assert_features_match_encoder(out, "val", encoder, keys)
    assert len(fstore.read_captions(out, "val").texts) == N_VAL * 5
    assert storage.exists(f"{out}/vocab.json")  # built from the train annotations, not extracted


@pytest.mark.integration
def test_bad_files_become_error_rows_and_good_ones_are_extracted(
    ray_session: None, s3_server, synthetic: SyntheticSet, encoder_cfg: EncoderConfig, tmp_path: Path
) -> None:
    files, errors, converted = _bad_and_odd_files(synthetic)
    _write_local(tmp_path / "mixed", files)
    bucket = s3_server.make_bucket()
    _upload(bucket, "mixed", tmp_path / "mixed")
    out = f"s3://{bucket}/out"
    result = extract_features(_config(out, encoder_cfg, images=f"s3://{bucket}/mixed"))
    summary = result.splits["images"]
    ok = len(files) - len(errors)
    assert (summary.ok, summary.failed, summary.converted, summary.pending) == (ok, len(errors), len(converted), 0)
    rows = fstore.read_errors(out, "images")
    assert [row["key"] for row in rows] == sorted(f"s3://{bucket}/mixed/{name}" for name in errors)
    for row in rows:
        name = row["key"].split("/mixed/", 1)[1]
        assert errors[name] in row["reason"] and row["image_id"] == image_id_for_key(name)
    assert len(fstore.read_features(out, "images")[0]) == ok
