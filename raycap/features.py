"""Ray Data stage: images (COCO or a bare folder/bucket) -> Parquet feature shards, captions, errors.

Reading, decoding and resizing run as CPU tasks; the encoder runs in an actor pool (one GPU per
actor when the cluster has GPUs) that loads its weights once; a datasink publishes each block as
whole shards (`raycap.feature_batches`). A crash loses only the shards in flight, and a rerun
encodes only the image ids that no published shard holds yet. Layout: `raycap.feature_store`.

Ray Data 2.58's own checkpointing (`DataContext.checkpoint_config`) was not used: it needs a
Read-based plan, keeps its ids apart from the data (a deleted shard would not be redone) and deletes
them after a successful run by default, so adding images would re-encode everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from raycap import feature_store as fstore
from raycap import storage
from raycap.config import check_bounds, file_only, flag, nested
from raycap.data.coco import SPLITS, ImageRecord, coco_files, load_coco_captions, load_karpathy_split
from raycap.data.images import DEFAULT_MAX_PIXELS
from raycap.data.vocab import Vocab
from raycap.feature_batches import FeatureEncoder, FeatureSink, decode_batch
from raycap.feature_store import FeatureSpec
from raycap.models.encoder import check_weights
from raycap.models.encoder_config import EncoderConfig
from raycap.runtime import init_ray

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VOCAB_SPLITS = ("train", "restval")  # Karpathy's training splits: the vocabulary sees no val/test caption


@dataclass(frozen=True)
class ExtractConfig:
    """Where images come from, where features go, the encoder, and how the pipeline is sized."""

    out: str = flag("--out", help="output folder or s3://bucket/prefix")
    coco_root: str | None = flag(
        "--coco-root", None, one_of="input",
        help="COCO layout: annotations/captions_{split}{year}.json and {split}{year}/",
    )
    images: str | None = flag(
        "--images", None, one_of="input",
        help="a folder or s3:// prefix of images without annotations (ids hash the key)",
    )
    karpathy_file: str | None = flag(
        "--karpathy-file", None, help="Karpathy's dataset_coco.json, for its splits (paths relative to --coco-root)"
    )
    splits: tuple[str, ...] = flag("--splits", ("train", "val"), choices=SPLITS)
    year: int = flag("--year", 2017)
    images_split: str = flag("--images-split", "images", help="split name for --images")
    encoder: EncoderConfig = nested(EncoderConfig)
    dtype: str = flag("--dtype", "float16", choices=sorted(fstore.DTYPES))
    stored_grid: int | None = flag(
        "--stored-grid", None,
        help="store features pooled to this grid (default: the trunk's native grid, e.g. 8 for resnet101 at 256)",
    )
    batch_size: int = flag("--batch-size", 32, at_least=1, help="images per encoder call")
    num_encoders: int | None = flag(
        "--encoders", None, metavar="N", help="encoder actors (default: one per GPU, else 1)"
    )
    encoder_cpus: float = flag("--encoder-cpus", 1.0, above=0, help="CPU slots per encoder actor without GPUs")
    torch_threads: int | None = flag(
        "--torch-threads", None, at_least=1, help="intra-op threads per CPU encoder (default: Ray's, one per CPU slot)"
    )
    decode_batch_size: int = flag(
        "--decode-batch-size", 16, at_least=1, help="images per decode task (a divisor of --batch-size avoids short batches)"
    )
    # CPU slots per read+decode (and write) task. Keep it unlike encoder_cpus: Ray fuses consecutive
    # stages with equal resources, which would move decoding into the encoder actors.
    decode_cpus: float = flag("--decode-cpus", 0.5, above=0, help="CPU slots per decode task; keep != --encoder-cpus")
    rows_per_shard: int = flag(
        "--rows-per-shard", 128, at_least=1, help="feature rows per shard (~34 MB for resnet101's native 8x8 grid in float16)"
    )
    limit: int | None = flag("--limit", None, at_least=1, help="encode at most this many new images per split")
    min_freq: int = flag("--min-freq", 5, at_least=1, help="vocabulary: minimum word count in train captions")
    max_words: int = flag("--max-words", 50, at_least=1, help="vocabulary: words kept per training caption")
    max_pixels: int = file_only(DEFAULT_MAX_PIXELS)  # decoded width x height at most (decompression bombs)

    def __post_init__(self) -> None:
        check_bounds(self)
        if (self.coco_root is None) == (self.images is None):
            raise ValueError("give exactly one input: a COCO root (with annotations) or an images folder/prefix")
        if self.karpathy_file and not self.coco_root:
            raise ValueError("a Karpathy split file needs the COCO root its image paths are relative to")
        FeatureSpec(self.encoder, self.dtype, self.stored_grid)  # validates dtype and stored_grid


@dataclass(frozen=True)
class SplitSummary:
    """A split after a run: totals over all published shards, and what this run added."""

    images: int  # records listed for the split
    ok: int
    converted: int  # of ok: images converted to RGB (grey, CMYK, alpha, palette, 16-bit)
    failed: int
    new_ok: int
    new_failed: int
    pending: int  # still neither extracted nor failed (a --limit run, or a crash)
    feature_bytes: int

    @property
    def bytes_per_image(self) -> float:
        return self.feature_bytes / self.ok if self.ok else 0.0


@dataclass(frozen=True)
class ExtractResult:
    out: str
    spec: FeatureSpec
    splits: dict[str, SplitSummary]
    vocab_size: int | None  # None without captions (images mode)
    seconds: float


def image_id_for_key(relative_key: str) -> int:
    """A stable non-negative int63 id for an image known only by its key (relative to the prefix),
    so ids survive copying the folder to a bucket and adding files."""
    digest = hashlib.blake2b(relative_key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def list_image_records(prefix: str, split: str) -> list[ImageRecord]:
    """Every image file under `prefix` (by suffix), with ids from `image_id_for_key`."""
    files = storage.list_files(prefix, IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {prefix}")
    keys = storage.relative_keys(prefix, [f.uri for f in files])
    return [ImageRecord(image_id_for_key(key), f.uri, 0, 0, (), split) for f, key in zip(files, keys)]


@contextmanager
def _local_copy(uri: str) -> Iterator[str]:
    """A local path for `uri`: itself, or a temporary download of an S3 object."""
    if not storage.is_s3(uri):
        yield uri
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, uri.rsplit("/", 1)[-1])
        with open(path, "wb") as f:
            f.write(storage.read_bytes(uri))
        yield path


def load_records(cfg: ExtractConfig, splits: Iterable[str]) -> dict[str, list[ImageRecord]]:
    """Records per split from the configured input."""
    splits = list(splits)
    if cfg.images is not None:
        return {cfg.images_split: list_image_records(cfg.images, cfg.images_split)}
    assert cfg.coco_root is not None
    if cfg.karpathy_file is not None:
        with _local_copy(cfg.karpathy_file) as path:
            records = load_karpathy_split(path, cfg.coco_root, splits)
        return {split: [r for r in records if r.split == split] for split in splits}
    out = {}
    for split in splits:
        annotations, image_dir = coco_files(cfg.coco_root, split, cfg.year)
        with _local_copy(annotations) as path:
            out[split] = load_coco_captions(path, image_dir, split)
    return out


def prepare_vocab(cfg: ExtractConfig, records: dict[str, list[ImageRecord]]) -> Vocab:
    """The saved vocab.json if there is one, else one built from the training captions and saved."""
    uri = storage.join(cfg.out, fstore.VOCAB_FILE)
    if storage.exists(uri):
        return fstore.read_vocab(cfg.out)
    training = VOCAB_SPLITS if cfg.karpathy_file else ("train",)  # COCO's own files have no restval
    missing = [split for split in training if split not in records]
    if missing:
        records = {**records, **load_records(cfg, missing)}
    captions = [c for split in training for r in records[split] for c in r.captions]
    if not captions:
        raise ValueError(f"no training captions to build the vocabulary from; put a vocab.json at {uri}")
    vocab = Vocab.build(captions, min_freq=cfg.min_freq, max_words=cfg.max_words)
    storage.write_bytes(uri, vocab.to_json().encode("utf-8"))
    return vocab


def write_captions(out: str, split: str, records: list[ImageRecord], vocab: Vocab) -> None:
    ids = [r.image_id for r in records for _ in r.captions]
    texts = [c for r in records for c in r.captions]
    fstore.write_table(fstore.captions_table(ids, texts, vocab), fstore.captions_uri(out, split))


def _check_spec(out: str, split: str, spec: FeatureSpec) -> None:
    stored = fstore.stored_spec(out, split)
    if stored is not None and stored != spec:
        same_but_grid = replace(stored, stored_grid=spec.stored_grid) == spec
        resume = f", or --stored-grid {stored.stored_grid} to go on at their grid" if same_but_grid else ""
        raise ValueError(
            f"{fstore.features_dir(out, split)} holds features from {stored}, but this run asks for {spec}: "
            f"use another --out, or delete that folder to re-extract{resume}"
        )


def _encoder_resources(cfg: ExtractConfig) -> tuple[int, dict[str, float]]:
    """Pool size and per-actor resources: a GPU each where the cluster has GPUs, else CPU slots."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return cfg.num_encoders or gpus, {"num_gpus": 1}
    return cfg.num_encoders or 1, {"num_cpus": cfg.encoder_cpus}


def extract_features(cfg: ExtractConfig) -> ExtractResult:
    """Extract features for every image not yet in a published shard; write captions, vocab, manifest.

    Uses the running Ray cluster, or starts one (RAY_ADDRESS is honoured).
    """
    start = time.perf_counter()
    local = {k: storage.absolute(v) for k in ("out", "coco_root", "karpathy_file", "images") if (v := getattr(cfg, k))}
    cfg = replace(cfg, **local)  # Ray tasks may run in other folders
    spec = FeatureSpec(cfg.encoder, cfg.dtype, cfg.stored_grid)
    records = load_records(cfg, cfg.splits)
    check_weights(cfg.encoder)  # on the driver, before any work: one line, not an actor crash each
    vocab = None
    if cfg.images is None:
        vocab = prepare_vocab(cfg, records)
        for split, split_records in records.items():
            write_captions(cfg.out, split, split_records, vocab)
    pending = []
    for split, split_records in records.items():
        _check_spec(cfg.out, split, spec)
        done = fstore.split_state(cfg.out, split).done_ids
        todo = [r for r in split_records if r.image_id not in done]
        pending += todo[: cfg.limit] if cfg.limit is not None else todo
    new = _run_pipeline(cfg, spec, pending) if pending else {}
    splits = {split: _summarize(cfg, split, rs, new.get(split, Counter())) for split, rs in records.items()}
    result = ExtractResult(cfg.out, spec, splits, len(vocab) if vocab else None, time.perf_counter() - start)
    _write_manifest(cfg, result)
    return result


def _run_pipeline(cfg: ExtractConfig, spec: FeatureSpec, records: list[ImageRecord]) -> dict[str, Counter]:
    """Decode (tasks) -> encode (actor pool) -> publish shards; returns this run's counts per split."""
    init_ray()
    pool_size, resources = _encoder_resources(cfg)
    rows = pa.table(
        {
            "image_id": pa.array([r.image_id for r in records], pa.int64()),
            "key": [r.path for r in records],
            "split": [r.split for r in records],
        }
    )
    step = cfg.decode_batch_size  # one block per decode task, so decoding spreads over tasks
    ds = ray.data.from_arrow([rows.slice(i, step) for i in range(0, len(rows), step)])
    ds = ds.map_batches(
        decode_batch,
        batch_size=cfg.decode_batch_size,
        batch_format="numpy",
        fn_kwargs={"image_size": cfg.encoder.image_size, "max_pixels": cfg.max_pixels},
        num_cpus=cfg.decode_cpus,
    )
    ds = ds.map_batches(
        FeatureEncoder,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={"spec": spec, "torch_threads": cfg.torch_threads},
        compute=ActorPoolStrategy(size=pool_size),
        **resources,
    )
    sink = FeatureSink(cfg.out, spec, cfg.rows_per_shard)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": cfg.decode_cpus})
    return sink.counts


def _summarize(cfg: ExtractConfig, split: str, records: list[ImageRecord], new: Counter) -> SplitSummary:
    state = fstore.split_state(cfg.out, split)
    return SplitSummary(
        images=len(records),
        ok=len(state.feature_ids),
        converted=state.converted,
        failed=len(state.error_ids),
        new_ok=new["ok"],
        new_failed=new["failed"],
        pending=len({r.image_id for r in records} - state.done_ids),
        feature_bytes=state.feature_bytes,
    )


def _write_manifest(cfg: ExtractConfig, result: ExtractResult) -> None:
    splits = {
        split: {**asdict(s), "bytes_per_image": round(s.bytes_per_image, 1)} for split, s in result.splits.items()
    }
    manifest = {
        "features": {**json.loads(result.spec.to_json()), "description": result.spec.describe()},
        "source": cfg.coco_root or cfg.images,
        "splits": splits,
        "vocab_size": result.vocab_size,
    }
    data = json.dumps(manifest, indent=2).encode("utf-8")
    storage.write_bytes(storage.join(cfg.out, fstore.MANIFEST_FILE), data)
