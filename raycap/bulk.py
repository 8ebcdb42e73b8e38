"""Bulk captioning: every file under a folder or s3:// prefix -> one result row per file.

    list (driver) -> read + decode + resize (Ray Data CPU tasks) -> caption (an actor pool of light
    clients calling the Serve Encoder and Decoder through handles) -> result shards (driver)

The images go through the same Serve deployments as online traffic, so bulk load drives their
autoscaling; each client keeps `in_flight` requests outstanding so the deployments' dynamic
batches fill up. Decoding happens on the CPU workers with the one shared `load_images`, and the
Encoder gets pixels (`encode_pixels`), so a caption is the same as over HTTP. The application's
request limits (its `args:` in serve_config.yaml: max_beam_size, max_image_bytes, max_pixels) hold
here as over HTTP.

Exactly once: the driver commits rows in shards (`results/part-<run>-<n>.<fmt>`), each written
atomically, and never writes a key twice in a run; a rerun first reads the keys of every committed
shard and captions only the rest. A crash loses only uncommitted rows, which the rerun redoes.
A file that cannot be captioned (not an image, corrupt, too large, unreadable after retries)
becomes a row with status "error" and its reason; the job never stops on one.
"""

from __future__ import annotations

import fnmatch
import io
import json
import secrets
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from raycap import storage
from raycap.config import file_only, flag
from raycap.data.images import ImageError, load_images
from raycap.models.decoding import BEAM_SIZE
from raycap.runtime import init_ray
from raycap.serve_schema import APP_NAME, SERVE_CONFIG

RESULTS_DIR = "results"
SUMMARY_FILE = "summary.json"
Format = Literal["parquet", "jsonl"]
FORMATS: tuple[str, ...] = typing.get_args(Format)
RESULT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the file's full URI or path
        ("caption", pa.string()),  # null on error
        ("score", pa.float64()),  # log-probability of the caption; null on error
        ("model", pa.string()),  # the served model's name (its checkpoint folder unless configured)
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),  # the reason, on error
    ]
)

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class BulkConfig:
    """What to caption, where results go, and how hard to drive the Serve deployments."""

    source: str = flag(
        "--source", help="folder or s3://bucket/prefix; every file under it (recursive) is captioned"
    )
    out: str = flag("--out", help="folder or s3://bucket/prefix for results/ and summary.json")
    checkpoint: str | None = flag(
        "--checkpoint", None, help="deploy the Serve application with this checkpoint if it is not running"
    )
    model: str | None = flag(
        "--model", None, help="the served model to caption with (GET /models); default: the application's default"
    )
    serve_config: str = flag("--serve-config", SERVE_CONFIG, help="Serve config used to deploy the application")
    app_name: str = flag("--app-name", APP_NAME, help="Serve application to use")
    http_port: int | None = flag("--http-port", None, help="HTTP port when deploying (default: the Serve config's)")
    format: Format = flag("--format", "parquet")
    include: tuple[str, ...] = flag(
        "--include", (), action="append", help="glob on keys relative to --source (repeatable); none: every file"
    )
    exclude: tuple[str, ...] = flag("--exclude", (), action="append", help="glob to leave out (repeatable)")
    limit: int | None = flag("--limit", None, help="caption at most this many new files")
    dry_run: bool = flag("--dry-run", False, help="only count what would be captioned")
    beam_size: int = flag("--beam-size", BEAM_SIZE, help="at most the Serve application's max_beam_size")
    read_batch_size: int = flag("--read-batch-size", 16, help="files per read task")
    read_cpus: float = file_only(0.5)  # CPU slots per read task
    clients: int = flag("--clients", 2, help="caption client actors")
    client_cpus: float = file_only(0.1)  # they only wait on handles
    in_flight: int = flag(
        "--in-flight", 32, help="requests each client keeps outstanding (its batch size)"
    )
    retries: int = flag("--retries", 3, help="extra attempts for failed reads and requests")
    request_timeout_s: float = file_only(300.0)
    rows_per_shard: int = flag("--rows-per-shard", 1000, help="rows per committed result shard")
    commit_every_s: float = file_only(60.0)  # commit a smaller shard after this long, so a crash loses little

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        sizes = (self.read_batch_size, self.clients, self.in_flight, self.rows_per_shard, self.beam_size)
        if min(sizes) < 1:
            raise ValueError("read_batch_size, clients, in_flight, rows_per_shard and beam_size must be >= 1")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")


@dataclass(frozen=True)
class Served:
    """The model the Serve application runs, as its Decoder reports it, and the application's limits."""

    name: str
    checkpoint: str
    image_size: int
    max_image_bytes: int  # larger files become error rows without being read
    max_pixels: int  # decoded width x height; larger (decompression bombs): error rows


@dataclass
class BulkSummary:
    """Counts for a run; totals are over every committed shard, `new_*` over this run."""

    source: str
    out: str
    listed: int  # files under source
    matched: int  # after include/exclude
    already_done: int  # matched files with a committed row before this run
    todo: int  # files this run set out to caption (after --limit)
    new_ok: int = 0
    new_failed: int = 0
    total_ok: int = 0
    total_failed: int = 0
    pending: int = 0  # matched files still without a row
    duplicates: int = 0  # keys with more than one committed row (only if runs overlapped)
    elapsed_s: float = 0.0
    images_per_s: float = 0.0  # this run's rows / elapsed
    model: str | None = None
    checkpoint: str | None = None
    dry_run: bool = False
    shards: list[str] = field(default_factory=list)  # committed by this run


# --- listing and resume ------------------------------------------------------------------------


def select(relative_keys: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> list[bool]:
    """Which keys pass the filters: any `include` pattern (all when none) and no `exclude` one.
    Patterns are shell globs (fnmatch) where `*` also matches `/`: `*.jpg` matches `a/b.jpg`."""
    return [
        (not include or any(fnmatch.fnmatchcase(k, p) for p in include))
        and not any(fnmatch.fnmatchcase(k, p) for p in exclude)
        for k in relative_keys
    ]


def list_sources(cfg: BulkConfig) -> tuple[int, list[storage.FileInfo]]:
    """(files listed, files that pass the filters). Files under `out` are left out when `out` lies
    inside `source`, so results are never captioned."""
    if not storage.exists(cfg.source):
        raise FileNotFoundError(f"source {cfg.source} does not exist (or holds no file yet)")
    files = storage.list_files(cfg.source)
    out = storage.absolute(cfg.out).rstrip("/") + "/"  # spelt as list_files spells URIs
    inside = [f for f in files if not f.uri.startswith(out)]
    relative = storage.relative_keys(cfg.source, [f.uri for f in inside])
    return len(files), [f for f, keep in zip(inside, select(relative, cfg.include, cfg.exclude)) if keep]


def shard_uris(out: str) -> list[str]:
    """Committed result shards under `out`, oldest run first."""
    results = storage.join(out, RESULTS_DIR)
    if not storage.exists(results):
        return []
    return [f.uri for f in storage.list_files(results, tuple(f".{fmt}" for fmt in FORMATS))]


def _read_shard(uri: str) -> pa.Table:
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        return pq.read_table(io.BytesIO(data), schema=RESULT_SCHEMA)
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def read_results(out: str) -> pa.Table:
    """Every committed result row under `out` (both formats), in RESULT_SCHEMA."""
    tables = [_read_shard(uri) for uri in shard_uris(out)]
    return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()


# --- the Serve application ---------------------------------------------------------------------


def _app_running(app_name: str) -> bool:
    from ray import serve  # here, not at the top: Ray Data's read tasks import this module, and need no Serve

    status = serve.status().applications.get(app_name)
    return status is not None and status.status == "RUNNING"


def ensure_app(cfg: BulkConfig) -> Served:
    """The running Serve application's model and limits, deploying the application first if it is not running.

    Raises ValueError when the running application serves another checkpoint than `cfg.checkpoint`,
    or no model named `cfg.model` (default: the application's default model), rather than captioning
    with a model the user did not ask for, and InvalidOptions (a ValueError) for a beam size beyond
    the application's limit.
    """
    from ray import serve

    from raycap.serve_deploy import deploy, load_config  # the Serve stage, imported only when captioning
    from raycap.serve_schema import CaptionOptions

    if not _app_running(cfg.app_name):
        if cfg.checkpoint is None:
            raise ValueError(
                f"Serve application {cfg.app_name!r} is not running: pass a checkpoint to deploy it, "
                "or start it first (`serve deploy serve_config.yaml`)"
            )
        url = deploy(load_config(cfg.serve_config, checkpoint=cfg.checkpoint, port=cfg.http_port))
        print(f"[raycap] bulk: deployed Serve application {cfg.app_name!r} ({url}) with {cfg.checkpoint}", flush=True)
    decoder = serve.get_deployment_handle("Decoder", cfg.app_name)
    listed = decoder.models.remote().result()
    names = [m.name for m in listed.models]
    if cfg.model is not None and cfg.model not in names:
        raise ValueError(f"Serve application {cfg.app_name!r} has no model {cfg.model!r}: it serves {', '.join(names)}")
    info = decoder.options(multiplexed_model_id=cfg.model or listed.default).info.remote().result()
    if cfg.checkpoint is not None and info.checkpoint.rstrip("/") != cfg.checkpoint.rstrip("/"):
        raise ValueError(
            f"Serve application {cfg.app_name!r} already serves {info.checkpoint}, not {cfg.checkpoint}: "
            "drop the checkpoint argument to caption with the running model, or deploy the other one first"
        )
    limits = serve.get_app_handle(cfg.app_name).limits.remote().result()
    limits.check_options(CaptionOptions(beam_size=cfg.beam_size))
    return Served(info.model, info.checkpoint, int(info.encoder["image_size"]), limits.max_image_bytes,
                  limits.max_pixels)  # fmt: skip


# --- what Ray Data runs ------------------------------------------------------------------------


def _read(uri: str, retries: int) -> bytes:
    """The file's bytes, retrying transient failures (a missing or forbidden file is not retried)."""
    for attempt in range(retries + 1):
        try:
            return storage.read_bytes(uri)
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as exc:
            if attempt == retries:
                raise OSError(f"{exc} (after {retries + 1} attempts)") from exc
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def read_batch(batch: Batch, image_size: int, max_image_bytes: int, max_pixels: int, retries: int) -> Batch:
    """Read, decode and resize each file (`load_images`); a file that cannot be captioned, a file
    over `max_image_bytes` included, gets an `error` reason. Adds image (B, S, S, 3) uint8 (zeros on
    error) and error ("" if ok)."""
    sizes = dict(zip(batch["key"], batch["size"]))

    def read(key: str) -> bytes:
        if sizes[key] > max_image_bytes:  # by its listed size: never read
            raise ImageError(f"file of {sizes[key]} bytes exceeds the limit of {max_image_bytes} bytes")
        return _read(key, retries)

    images, _, errors = load_images(batch["key"], read, image_size, max_pixels)
    return {"key": batch["key"], "image": images, "error": errors}


class CaptionClient:
    """Stateful batch function: sends each decodable image of a batch through the Encoder and the
    Decoder (all at once, so the batch is in flight together) and retries failed requests."""

    def __init__(self, app_name: str, model: str, beam_size: int, retries: int, timeout_s: float) -> None:
        from ray import serve

        from raycap.serve_schema import CaptionOptions  # not raycap.serve: client actors need no torch

        self.encoder = serve.get_deployment_handle("Encoder", app_name)
        self.decoder = serve.get_deployment_handle("Decoder", app_name).options(multiplexed_model_id=model)
        self.options = CaptionOptions(beam_size=beam_size)
        self.retries, self.timeout_s = retries, timeout_s

    def _submit(self, image: np.ndarray) -> Any:
        return self.decoder.caption.remote(self.encoder.encode_pixels.remote(image), self.options)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["key"])
        # "" rather than None: an all-None object column would lose its string type in Arrow.
        captions, models = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
        scores = np.full(n, np.nan)
        errors = batch["error"].copy()
        pending = {i: self._submit(batch["image"][i]) for i in range(n) if errors[i] == ""}
        for i, response in pending.items():
            for attempt in range(self.retries + 1):
                try:
                    result = response.result(timeout_s=self.timeout_s)
                except ValueError as exc:  # the request itself is wrong (e.g. options): retrying cannot help
                    errors[i] = f"caption request rejected: {exc}"
                    break
                except Exception as exc:  # replica died, timeout, checkpoint swap in progress: try again
                    if attempt == self.retries:
                        errors[i] = f"caption request failed after {attempt + 1} attempts: {type(exc).__name__}: {exc}"
                        break
                    time.sleep(0.5 * 2**attempt)
                    response = self._submit(batch["image"][i])
                else:
                    captions[i], scores[i], models[i] = result.caption, result.score, result.model
                    break
        return {"key": batch["key"], "caption": captions, "score": scores, "model": models, "error": errors}


# --- writing -----------------------------------------------------------------------------------


def _rows_table(batch: dict[str, Any]) -> pa.Table:
    """A client batch (columns) -> RESULT_SCHEMA rows."""
    errors = [str(e) for e in batch["error"]]
    ok = [e == "" for e in errors]
    return pa.table(
        {
            "key": [str(k) for k in batch["key"]],
            "caption": [c if good else None for c, good in zip(batch["caption"], ok)],
            "score": [float(s) if good else None for s, good in zip(batch["score"], ok)],
            "model": [m if good else None for m, good in zip(batch["model"], ok)],
            "status": ["ok" if good else "error" for good in ok],
            "error": [None if good else e for e, good in zip(errors, ok)],
        },
        schema=RESULT_SCHEMA,
    )


class ShardWriter:
    """Buffers result rows and commits them as whole shards, each key at most once per run."""

    def __init__(self, cfg: BulkConfig) -> None:
        self.cfg = cfg
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.written: set[str] = set()
        self.shards: list[str] = []
        self.ok = self.failed = 0
        self.last_commit = time.monotonic()

    def add(self, rows: pa.Table) -> None:
        keys = rows.column("key").to_pylist()
        fresh = [k not in self.written for k in keys]
        if not all(fresh):  # a retried upstream task: its rows were already taken
            rows = rows.filter(pa.array(fresh))
        self.written.update(rows.column("key").to_pylist())
        self.buffer.append(rows)
        self.buffered += len(rows)
        due = time.monotonic() - self.last_commit > self.cfg.commit_every_s
        if self.buffered >= self.cfg.rows_per_shard or (due and self.buffered):
            self.commit()

    def commit(self) -> None:
        """Write the buffered rows as one shard (atomically: the whole shard appears, or none)."""
        if not self.buffered:
            return
        table = pa.concat_tables(self.buffer)
        name = f"part-{self.run_id}-{len(self.shards):05d}.{self.cfg.format}"
        uri = storage.join(self.cfg.out, RESULTS_DIR, name)
        storage.write_bytes(uri, _encode(table, self.cfg.format))
        failed = sum(1 for s in table.column("status").to_pylist() if s == "error")
        self.ok += len(table) - failed
        self.failed += failed
        self.shards.append(uri)
        self.buffer, self.buffered, self.last_commit = [], 0, time.monotonic()


def _encode(table: pa.Table, fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in table.to_pylist()).encode("utf-8")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# --- the job -----------------------------------------------------------------------------------


def _pipeline(cfg: BulkConfig, todo: list[storage.FileInfo], served: Served) -> Iterator[pa.Table]:
    """Result rows for `todo`, as the caption clients produce them."""
    rows = pa.table({"key": [f.uri for f in todo], "size": pa.array([f.size for f in todo], pa.int64())})
    step = cfg.read_batch_size  # one block per read task, so reading spreads over tasks
    ds = ray.data.from_arrow([rows.slice(i, step) for i in range(0, len(rows), step)])
    ds = ds.map_batches(
        read_batch,
        batch_size=cfg.read_batch_size,
        batch_format="numpy",
        fn_kwargs={
            "image_size": served.image_size, "max_image_bytes": served.max_image_bytes,
            "max_pixels": served.max_pixels, "retries": cfg.retries,
        },  # fmt: skip
        num_cpus=cfg.read_cpus,
    )
    ds = ds.map_batches(
        CaptionClient,
        batch_size=cfg.in_flight,
        batch_format="numpy",
        fn_constructor_kwargs={
            "app_name": cfg.app_name, "model": served.name, "beam_size": cfg.beam_size, "retries": cfg.retries,
            "timeout_s": cfg.request_timeout_s,
        },  # fmt: skip
        compute=ActorPoolStrategy(size=cfg.clients),
        num_cpus=cfg.client_cpus,
    )
    # No prefetching: it would hold each client batch back until the next one is done.
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        yield _rows_table(batch)


def _finish(cfg: BulkConfig, summary: BulkSummary, matched: list[storage.FileInfo]) -> None:
    """Fill the totals from every committed shard."""
    results = read_results(cfg.out)
    keys = results.column("key").to_pylist()
    statuses = dict(zip(keys, results.column("status").to_pylist()))
    summary.duplicates = len(keys) - len(statuses)
    summary.total_ok = sum(1 for s in statuses.values() if s == "ok")
    summary.total_failed = len(statuses) - summary.total_ok
    summary.pending = sum(1 for f in matched if f.uri not in statuses)


def caption_bucket(cfg: BulkConfig) -> BulkSummary:
    """Caption every matching file under `cfg.source` that has no committed row yet; write the rows
    and `summary.json` under `cfg.out`. Uses the running Ray cluster, or starts one (RAY_ADDRESS is
    honoured), and the running Serve application, or deploys it (`ensure_app`)."""
    start = time.perf_counter()
    cfg = replace(cfg, source=storage.absolute(cfg.source), out=storage.absolute(cfg.out))  # as keys, and for workers
    listed, matched = list_sources(cfg)
    done = set(read_results(cfg.out).column("key").to_pylist())
    remaining = [f for f in matched if f.uri not in done]
    todo = remaining[: cfg.limit] if cfg.limit is not None else remaining
    summary = BulkSummary(cfg.source, cfg.out, listed, len(matched), len(matched) - len(remaining), len(todo),
                          dry_run=cfg.dry_run)  # fmt: skip
    if cfg.dry_run:
        summary.pending = len(remaining)
        summary.elapsed_s = time.perf_counter() - start
        return summary
    init_ray()
    served = ensure_app(cfg)
    summary.model, summary.checkpoint = served.name, served.checkpoint
    writer = ShardWriter(cfg)
    print(f"[raycap] bulk: {len(todo)} files to caption with {served.name} ({served.checkpoint}); "
          f"{summary.already_done} already done", flush=True)  # fmt: skip
    last_report = time.monotonic()
    try:
        for rows in _pipeline(cfg, todo, served) if todo else ():
            writer.add(rows)
            if time.monotonic() - last_report > 10:
                _progress(writer, len(todo), start)
                last_report = time.monotonic()
    finally:
        writer.commit()  # rows captioned before a Ctrl-C or a failure are kept, not redone
    summary.new_ok, summary.new_failed, summary.shards = writer.ok, writer.failed, writer.shards
    summary.elapsed_s = time.perf_counter() - start
    summary.images_per_s = (writer.ok + writer.failed) / summary.elapsed_s
    _finish(cfg, summary, matched)
    data = json.dumps(asdict(summary), indent=2).encode("utf-8")
    storage.write_bytes(storage.join(cfg.out, SUMMARY_FILE), data)
    return summary


def _progress(writer: ShardWriter, total: int, start: float) -> None:
    rows = writer.ok + writer.failed + writer.buffered
    rate = rows / (time.perf_counter() - start)
    print(f"[raycap] bulk: {rows}/{total} files captioned ({rate:.1f}/s), {writer.failed} errors committed, "
          f"{len(writer.shards)} shards committed", flush=True)  # fmt: skip
