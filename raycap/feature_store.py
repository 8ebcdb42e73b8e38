"""The on-disk layout of extracted features, its Parquet schemas, and the readers training uses.

Under one output root (a folder or an s3:// prefix)::

    vocab.json                     the caption vocabulary (built from train captions)
    manifest.json                  counts, feature spec (encoder, stored grid, shape), bytes per image
    features/{split}/part-*.parquet  image_id, key, width, height, converted_from, features (P, C)
    captions/{split}.parquet       image_id, caption, tokens (max_words + 2) int32
    errors/{split}/part-*.parquet  key, image_id, reason

`features` is pyarrow's canonical fixed-shape tensor extension type, so any pyarrow reader gets a
zero-copy (N, P, C) numpy view with `.to_numpy_ndarray()`. P is the stored grid squared: by default
the trunk's native grid (8x8 for ResNet-101 at 256), which the decoder pools to the encoder config's
grid when it reads them; shards written before native storage hold features pooled to that grid.
Every shard is written whole, then published atomically (rename locally, one completed upload on
S3): a shard that is listed is complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from raycap import storage
from raycap.data.vocab import Vocab
from raycap.models.encoder_config import EncoderConfig

FEATURES, CAPTIONS, ERRORS = "features", "captions", "errors"
VOCAB_FILE, MANIFEST_FILE = "vocab.json", "manifest.json"
METADATA_KEY = b"raycap.features"
DTYPES = {"float16": pa.float16(), "float32": pa.float32()}

ERROR_SCHEMA = pa.schema([("key", pa.string()), ("image_id", pa.int64()), ("reason", pa.string())])


@dataclass(frozen=True)
class FeatureSpec:
    """What the feature tensors are: the encoder that made them and how they are stored."""

    encoder: EncoderConfig
    dtype: str = "float16"  # one of DTYPES
    # Side of the stored grid; None means the trunk's native grid (encoder.native_grid) and is
    # replaced by it, so specs of the same storage compare equal.
    stored_grid: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"feature dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.stored_grid is None:
            object.__setattr__(self, "stored_grid", self.encoder.native_grid)
        elif self.stored_grid < 1:
            raise ValueError(f"stored_grid must be >= 1, got {self.stored_grid}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.stored_grid**2, self.encoder.feature_dim)  # (P, C)

    def describe(self) -> str:
        """The grids in words, e.g. "8x8x2048 float16, the native grid of resnet101 at 256x256,
        upsampled to 14x14 by the decoder" (adaptive average pooling adds no information)."""
        e, stored, native = self.encoder, self.stored_grid, self.encoder.native_grid
        source = "the native grid" if stored == native else f"{_resized(native, stored)} from the {native}x{native} grid"
        use = "used as stored" if stored == e.grid else f"{_resized(stored, e.grid)} to {e.grid}x{e.grid} by the decoder"
        size = f"{e.arch} at {e.image_size}x{e.image_size}"
        return f"{stored}x{stored}x{e.feature_dim} {self.dtype}, {source} of {size}, {use}"

    def schema(self) -> pa.Schema:
        """Schema of a features shard, with this spec in the file metadata."""
        tensor = pa.fixed_shape_tensor(DTYPES[self.dtype], list(self.shape))
        fields = [
            ("image_id", pa.int64()),
            ("key", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("converted_from", pa.string()),  # original PIL mode when not RGB, else null
            ("features", tensor),
        ]
        return pa.schema(fields, metadata={METADATA_KEY: self.to_json()})

    def to_json(self) -> str:
        fields = {"encoder": asdict(self.encoder), "dtype": self.dtype, "stored_grid": self.stored_grid}
        return json.dumps({**fields, "shape": list(self.shape)})

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None, where: str) -> FeatureSpec:
        if not metadata or METADATA_KEY not in metadata:
            raise ValueError(f"{where} has no {METADATA_KEY.decode()} metadata: not written by raycap.features")
        data = json.loads(metadata[METADATA_KEY])
        encoder = EncoderConfig(**data["encoder"])
        # Shards from before native storage have no stored_grid: they were pooled to the encoder's grid.
        return cls(encoder, data["dtype"], data.get("stored_grid", encoder.grid))


def _resized(before: int, after: int) -> str:
    return "upsampled" if after > before else "pooled"


@dataclass(frozen=True)
class Captions:
    """One row per caption: which image, the text, and its fixed-length token ids."""

    image_ids: np.ndarray  # (M,) int64
    texts: list[str]
    tokens: np.ndarray  # (M, max_words + 2) int32


@dataclass(frozen=True)
class SplitState:
    """What the shards of one split already hold."""

    feature_ids: np.ndarray  # (N,) int64, image ids with features
    error_ids: np.ndarray  # (E,) int64, image ids that failed
    converted: int  # feature rows whose image was converted to RGB
    feature_bytes: int  # total size of the feature shards

    @property
    def done_ids(self) -> set[int]:
        """Image ids a rerun skips: extracted or failed (delete errors/{split} to retry failures)."""
        return {*self.feature_ids.tolist(), *self.error_ids.tolist()}


def check_root(out: str) -> None:
    """FileNotFoundError unless `out` is an extraction output root (what jobs/extract_features.py
    --out wrote); it names the root when `out` is a folder inside one, such as its features/."""
    if any(storage.exists(storage.join(out, name)) for name in (MANIFEST_FILE, FEATURES)):
        return
    parent = out.rstrip("/").rsplit("/", 1)[0]
    inside = parent != out and storage.exists(storage.join(parent, MANIFEST_FILE))
    hint = f"; {parent} is: give that" if inside else ": give the folder that jobs/extract_features.py --out wrote"
    raise FileNotFoundError(f"{out} is not an extraction output (no {MANIFEST_FILE} or {FEATURES}/ in it){hint}")


def features_dir(out: str, split: str) -> str:
    return storage.join(out, FEATURES, split)


def errors_dir(out: str, split: str) -> str:
    return storage.join(out, ERRORS, split)


def captions_uri(out: str, split: str) -> str:
    return storage.join(out, CAPTIONS, f"{split}.parquet")


def list_shards(directory: str) -> list[storage.FileInfo]:
    """Published Parquet shards under `directory`, sorted; none if it does not exist yet."""
    if not storage.exists(directory):
        return []
    return storage.list_files(directory, [".parquet"])


def write_table(table: pa.Table, uri: str) -> int:
    """Write `table` as one Parquet file, published atomically; returns its size in bytes."""
    sink = pa.BufferOutputStream()
    # Only converted_from repeats; dictionary-encoding float features or unique keys would only cost time.
    pq.write_table(table, sink, use_dictionary=["converted_from"])
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(uri, data)
    return len(data)


def features_table(
    spec: FeatureSpec,
    image_ids: np.ndarray,
    keys: list[str],
    widths: np.ndarray,
    heights: np.ndarray,
    converted_from: list[str | None],
    features: np.ndarray,
) -> pa.Table:
    """Rows of a features shard; `features` is (N, P, C) and is cast to the spec's dtype."""
    expected = (len(image_ids), *spec.shape)
    if features.shape != expected:
        raise ValueError(f"features have shape {features.shape}, expected {expected} for {spec.encoder}")
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(features, dtype=spec.dtype))
    columns = [
        pa.array(image_ids, pa.int64()),
        pa.array(keys, pa.string()),
        pa.array(widths, pa.int32()),
        pa.array(heights, pa.int32()),
        pa.array(converted_from, pa.string()),
        tensor,
    ]
    return pa.Table.from_arrays(columns, schema=spec.schema())


def errors_table(keys: list[str], image_ids: np.ndarray, reasons: list[str]) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(keys, pa.string()), pa.array(image_ids, pa.int64()), pa.array(reasons, pa.string())],
        schema=ERROR_SCHEMA,
    )


def captions_table(image_ids: list[int], texts: list[str], vocab: Vocab) -> pa.Table:
    tokens = vocab.encode_batch(texts)  # (M, max_words + 2) int32
    token_type = pa.list_(pa.int32(), tokens.shape[1])
    return pa.table(
        {
            "image_id": pa.array(image_ids, pa.int64()),
            "caption": pa.array(texts, pa.string()),
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), type=token_type),
        }
    )


def _read(uris: list[str], columns: list[str]) -> pa.Table:
    """Selected columns of many Parquet files, read in parallel."""
    fs, _ = storage.filesystem(uris[0])
    paths = [storage.filesystem(uri)[1] for uri in uris]
    return pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=columns)


def split_state(out: str, split: str) -> SplitState:
    """Read the ids (and small columns) of a split's published shards, for resuming and the manifest."""
    feature_shards = list_shards(features_dir(out, split))
    error_uris = [info.uri for info in list_shards(errors_dir(out, split))]
    empty = np.zeros(0, np.int64)
    feature_ids, converted = empty, 0
    if feature_shards:
        table = _read([info.uri for info in feature_shards], ["image_id", "converted_from"])
        feature_ids = table.column("image_id").to_numpy()
        converted = len(table) - table.column("converted_from").null_count
    feature_bytes = sum(info.size for info in feature_shards)
    error_ids = _read(error_uris, ["image_id"]).column("image_id").to_numpy() if error_uris else empty
    return SplitState(feature_ids, error_ids, converted, feature_bytes)


def stored_spec(out: str, split: str) -> FeatureSpec | None:
    """The spec recorded in the split's first features shard, or None if there is none yet."""
    shards = list_shards(features_dir(out, split))
    if not shards:
        return None
    uri = shards[0].uri
    fs, path = storage.filesystem(uri)
    return FeatureSpec.from_metadata(pq.read_schema(path, filesystem=fs).metadata, uri)


def _feature_uris(out: str, split: str) -> list[str]:
    uris = [info.uri for info in list_shards(features_dir(out, split))]
    if not uris:
        raise FileNotFoundError(
            f"no feature shards under {features_dir(out, split)}: run jobs/extract_features.py --out {out} first"
        )
    return uris


def read_feature_shard(uri: str) -> tuple[np.ndarray, np.ndarray, FeatureSpec]:
    """One shard: image ids (N,) int64, features (N, P, C) (a zero-copy view) and its spec."""
    fs, path = storage.filesystem(uri)
    table = pq.read_table(path, filesystem=fs, columns=["image_id", "features"])
    spec = FeatureSpec.from_metadata(table.schema.metadata, uri)
    features = table.column("features").combine_chunks().to_numpy_ndarray()  # (N, P, C)
    return table.column("image_id").to_numpy(), features, spec


def read_features(out: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All features of a split, sorted by image id: ids (N,) int64, features (N, P, C)."""
    shards = [read_feature_shard(uri) for uri in _feature_uris(out, split)]
    specs = {shard[2] for shard in shards}
    if len(specs) > 1:
        raise ValueError(f"shards under {features_dir(out, split)} were made with different encoders: {specs}")
    ids = np.concatenate([shard[0] for shard in shards])
    order = np.argsort(ids, kind="stable")
    features = np.concatenate([shard[1] for shard in shards])  # (N, P, C)
    return ids[order], features[order]


def read_captions(out: str, split: str) -> Captions:
    """The tokenised captions of a split (all annotated images, extracted or not)."""
    uri = captions_uri(out, split)
    fs, path = storage.filesystem(uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} not found: extract with COCO annotations to get captions")
    table = pq.read_table(path, filesystem=fs)
    tokens = table.column("tokens").combine_chunks()
    flat = tokens.flatten().to_numpy()
    return Captions(
        table.column("image_id").to_numpy(), table.column("caption").to_pylist(), flat.reshape(-1, tokens.type.list_size)
    )


def read_errors(out: str, split: str) -> list[dict[str, Any]]:
    """The images of a split that could not be used: [{key, image_id, reason}, ...] sorted by key."""
    uris = [info.uri for info in list_shards(errors_dir(out, split))]
    rows = _read(uris, ERROR_SCHEMA.names).to_pylist() if uris else []
    return sorted(rows, key=lambda row: row["key"])


def read_vocab(out: str) -> Vocab:
    uri = storage.join(out, VOCAB_FILE)
    try:
        return Vocab.from_json(storage.read_bytes(uri).decode("utf-8"))
    except ValueError as exc:
        raise ValueError(f"{uri}: {exc}") from None


def read_manifest(out: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(storage.join(out, MANIFEST_FILE)))


def read_keys(out: str, split: str) -> tuple[np.ndarray, list[str]]:
    """Image ids (N,) and their source keys (paths or URIs), for showing images next to results."""
    table = _read(_feature_uris(out, split), ["image_id", "key"])
    return table.column("image_id").to_numpy(), table.column("key").to_pylist()


def read_references(out: str, split: str) -> dict[int, list[str]]:
    """All reference captions of a split, by image id (for BLEU/CIDEr against every reference)."""
    captions = read_captions(out, split)
    refs: dict[int, list[str]] = {}
    for image_id, text in zip(captions.image_ids.tolist(), captions.texts):
        refs.setdefault(image_id, []).append(text)
    return refs
