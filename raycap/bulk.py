"""Bulk captioning: every file under a folder or s3:// prefix -> one result row per file.

    list pages, cut into chunks (driver) -> read + decode + resize (Ray Data CPU tasks) -> caption
    (an actor pool of light clients calling the Serve Encoder and Decoder through handles) ->
    one result shard per chunk, committed in listing order (driver)

The images go through the same Serve deployments as online traffic, so bulk load drives their
autoscaling; each client keeps `in_flight` requests outstanding so the deployments' dynamic
batches fill up. Decoding happens on the CPU workers with the one shared `load_images`, and the
Encoder gets pixels (`encode_pixels`), so a caption is the same as over HTTP. The application's
request limits (its `args:` in serve_config.yaml: max_beam_size, max_image_bytes, max_pixels) hold
here as over HTTP.

Bounded memory: the listing streams (S3 ListObjectsV2 pages, or a sorted walk of a folder) and is
cut into chunks of `rows_per_shard` consecutive matching files; the driver holds about two windows
of `window` files (one captioned by a Ray Data pass, the next being listed), never the whole key set.

Exactly once: a chunk is committed once all its rows are in, in listing order: its rows as one
shard (`results/part-<run>-<n>.<fmt>`, written atomically), then `progress.json` with the
watermark (the last listed URI of the committed prefix) and the prefix's counts. A rerun reads only
that record and lists after the watermark (S3's StartAfter), so it never reads the done keys. A
kill between the two writes leaves one shard the record does not cover yet (the `next_shard` it
names): the rerun reads that shard's rows (one chunk) and counts them instead of captioning its
files again. A crash loses only the rows of uncommitted chunks, which the rerun redoes.
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
from collections import Counter, defaultdict
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from raycap import storage
from raycap.config import check_bounds, file_only, flag
from raycap.data.images import ImageError, load_images
from raycap.models.decoding import BEAM_SIZE
from raycap.runtime import init_ray
from raycap.serve_schema import APP_NAME, SERVE_CONFIG

RESULTS_DIR = "results"
SUMMARY_FILE = "summary.json"
PROGRESS_FILE = "progress.json"
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
Pages = Iterable[Sequence[storage.FileInfo]]  # a listing, page by page, in listing order


@dataclass(frozen=True)
class BulkConfig:
    """What to caption, where results go, and how hard to drive the Serve deployments."""

    source: str = flag(
        "--source", help="folder or s3://bucket/prefix; every file under it (recursive) is captioned"
    )
    out: str = flag("--out", help="folder or s3://bucket/prefix for results/ and summary.json")
    checkpoint: str | None = flag(
        "--checkpoint", None,
        help="deploy the Serve application with this checkpoint (or a run folder: its best) if it is not running",
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
    limit: int | None = flag("--limit", None, at_least=1, help="caption at most this many new files")
    dry_run: bool = flag("--dry-run", False, help="only count what would be captioned")
    beam_size: int = flag("--beam-size", BEAM_SIZE, at_least=1, help="at most the Serve application's max_beam_size")
    read_batch_size: int = flag("--read-batch-size", 16, at_least=1, help="files per read task")
    read_cpus: float = file_only(0.5)  # CPU slots per read task
    clients: int = flag("--clients", 2, at_least=1, help="caption client actors")
    client_cpus: float = file_only(0.1)  # they only wait on handles
    in_flight: int = flag(
        "--in-flight", 32, at_least=1, help="requests each client keeps outstanding (its batch size)"
    )
    retries: int = flag("--retries", 3, at_least=0, help="extra attempts for failed reads and requests")
    request_timeout_s: float = file_only(300.0)
    rows_per_shard: int = flag(
        "--rows-per-shard", 1000, at_least=1, help="files per chunk: consecutive files committed as one result shard"
    )
    window: int = file_only(50_000)  # files to caption per Ray Data pass; the driver holds about two windows

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


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
    listed: int = 0  # files under source
    matched: int = 0  # after include/exclude
    already_done: int = 0  # matched files with a committed row before this run
    todo: int = 0  # files this run set out to caption (after --limit)
    new_ok: int = 0
    new_failed: int = 0
    total_ok: int = 0
    total_failed: int = 0
    pending: int = 0  # matched files still without a row
    elapsed_s: float = 0.0
    images_per_s: float = 0.0  # this run's rows / elapsed
    model: str | None = None
    checkpoint: str | None = None
    dry_run: bool = False
    shards: int = 0  # committed by this run


# --- listing and resume ------------------------------------------------------------------------


def select(relative_keys: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> list[bool]:
    """Which keys pass the filters: any `include` pattern (all when none) and no `exclude` one.
    Patterns are shell globs (fnmatch) where `*` also matches `/`: `*.jpg` matches `a/b.jpg`."""
    return [
        (not include or any(fnmatch.fnmatchcase(k, p) for p in include))
        and not any(fnmatch.fnmatchcase(k, p) for p in exclude)
        for k in relative_keys
    ]


@dataclass
class Chunk:
    """Consecutive files of the listing, committed together: the rows of its matching files as one
    shard, then the watermark moved to `last`."""

    last: str = ""  # the URI of its last listed file
    listed: int = 0  # files listed in it, matching or not
    todo: list[storage.FileInfo] = field(default_factory=list)  # matching files to caption
    adopted: list[str] = field(default_factory=list)  # matching files with a row in an uncounted shard


class Planner:
    """Cuts a listing (pages of files in listing order) into chunks of up to `rows_per_shard`
    matching files, and those into windows of about `window` files to caption, counting as it goes.
    It holds one chunk and one window at a time, whatever the listing's length. Files under `out`
    (when it lies inside `source`) never match, so results are never captioned."""

    def __init__(self, cfg: BulkConfig, adopted: Container[str] = frozenset()) -> None:
        self.cfg, self.adopted = cfg, adopted
        self.listed = self.matched = self.todo = 0  # over this listing
        self._source = cfg.source.rstrip("/") + "/"  # filters see keys relative to it
        self._out = cfg.out.rstrip("/") + "/"  # spelt as storage.list_pages spells URIs

    def chunks(self, pages: Pages) -> Iterator[Chunk]:
        """Chunks of the listing up to --limit's last file; the files after it are only counted."""
        cfg, chunk = self.cfg, Chunk()
        limit = cfg.limit if cfg.limit is not None else -1
        filtered = bool(cfg.include or cfg.exclude)
        for page in pages:
            keep = select([f.uri[len(self._source) :] for f in page], cfg.include, cfg.exclude) if filtered else None
            for i, file in enumerate(page):
                self.listed += 1
                matches = (keep is None or keep[i]) and not file.uri.startswith(self._out)
                self.matched += matches
                if self.todo == limit:
                    continue
                chunk.listed += 1
                chunk.last = file.uri
                if not matches:
                    continue
                if file.uri in self.adopted:
                    chunk.adopted.append(file.uri)
                else:
                    chunk.todo.append(file)
                    self.todo += 1
                if len(chunk.todo) + len(chunk.adopted) == cfg.rows_per_shard or self.todo == limit:
                    yield chunk
                    chunk = Chunk()
        if chunk.listed:
            yield chunk

    def windows(self, pages: Pages) -> Iterator[list[Chunk]]:
        """Consecutive chunks holding at least `window` files to caption, the last one fewer."""
        window: list[Chunk] = []
        size = 0
        for chunk in self.chunks(pages):
            window.append(chunk)
            size += len(chunk.todo)
            if size >= self.cfg.window:
                yield window
                window, size = [], 0
        if window:
            yield window


@dataclass
class Progress:
    """`out`'s record of what is committed, rewritten whole after each chunk: the committed prefix of
    the listing (every file up to `watermark`) and its counts, and the shards that may hold rows of
    files after it."""

    source: str
    include: list[str]
    exclude: list[str]
    watermark: str | None = None  # the URI of the prefix's last file; None: nothing committed yet
    listed: int = 0  # files in the prefix
    matched: int = 0  # of those, files that pass the filters: each has one row
    ok: int = 0
    failed: int = 0
    shards: int = 0  # committed shards
    next_shard: str | None = None  # the shard the running run writes next (a name under results/)
    orphans: list[str] = field(default_factory=list)  # shards of killed runs with rows after the watermark

    def advance(self, chunk: Chunk, ok: int, failed: int) -> None:
        """Move the watermark past `chunk`, whose rows are committed (`ok` + `failed` of them)."""
        self.watermark = chunk.last
        self.listed += chunk.listed
        self.matched += len(chunk.todo) + len(chunk.adopted)
        self.ok += ok
        self.failed += failed


def load_progress(cfg: BulkConfig) -> Progress:
    """`cfg.out`'s progress record, or a fresh one. Raises ValueError when `out` holds the results
    of another source or other filters, or results without a record (written before records were)."""
    uri = storage.join(cfg.out, PROGRESS_FILE)
    fresh = Progress(cfg.source, list(cfg.include), list(cfg.exclude))
    if not storage.exists(uri):
        if storage.exists(storage.join(cfg.out, RESULTS_DIR)):
            raise ValueError(
                f"{cfg.out} holds {RESULTS_DIR}/ but no {PROGRESS_FILE} (written by an older raycap, or not by "
                "this job): caption into a new --out"
            )
        return fresh
    progress = Progress(**json.loads(storage.read_bytes(uri)))
    if (progress.source, progress.include, progress.exclude) != (fresh.source, fresh.include, fresh.exclude):
        raise ValueError(
            f"{cfg.out} holds the captions of --source {progress.source} with --include {progress.include} "
            f"--exclude {progress.exclude}: a rerun resumes only the same listing, so pass those, or caption "
            "into a new --out"
        )
    return progress


def save_progress(out: str, progress: Progress) -> None:
    storage.write_bytes(storage.join(out, PROGRESS_FILE), json.dumps(asdict(progress), indent=1).encode("utf-8"))


def uncounted_rows(out: str, progress: Progress) -> dict[str, tuple[str, bool]]:
    """Rows that `progress` does not count yet: those of its orphans and of its `next_shard` if a
    kill left it written but unrecorded (at most one chunk per killed run): key -> (shard, ok).
    Sets `progress.orphans` to the shards they come from."""
    names = [*progress.orphans]
    if progress.next_shard is not None and storage.exists(storage.join(out, RESULTS_DIR, progress.next_shard)):
        names.append(progress.next_shard)
    rows = {}
    for name in names:
        table = _read_shard(storage.join(out, RESULTS_DIR, name))
        for key, status in zip(table.column("key").to_pylist(), table.column("status").to_pylist()):
            rows[key] = (name, status == "ok")
    progress.orphans = names
    return rows


@dataclass
class Plan:
    """Where a run resumes, and what it captions."""

    progress: Progress  # out's record
    uncounted: dict[str, tuple[str, bool]]  # rows the record does not count yet (uncounted_rows)
    planner: Planner  # its counts grow as `windows` is consumed
    windows: Iterator[list[Chunk]]  # of the files listed after the watermark


def plan(cfg: BulkConfig, list_pages: Callable[[str, str | None], Pages] = storage.list_pages) -> Plan:
    """Read `cfg.out`'s record and uncounted shards, and plan the listing after its watermark:
    `list_pages(source, start_after)` gives the pages (storage.list_pages, or any source of pages
    in listing order). Nothing is listed until `windows` is consumed."""
    progress = load_progress(cfg)
    uncounted = uncounted_rows(cfg.out, progress)
    planner = Planner(cfg, uncounted)
    return Plan(progress, uncounted, planner, planner.windows(list_pages(cfg.source, progress.watermark)))


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
    """Stateful batch function: sends each decodable image of a batch through the Encoder (all at
    once, so the batch is in flight together) and then the Decoder, and retries failed requests."""

    def __init__(self, app_name: str, model: str, beam_size: int, retries: int, timeout_s: float) -> None:
        from ray import serve

        from raycap.serve_schema import CaptionOptions  # not raycap.serve: client actors need no torch

        self.encoder = serve.get_deployment_handle("Encoder", app_name)
        self.decoder = serve.get_deployment_handle("Decoder", app_name).options(multiplexed_model_id=model)
        self.options = CaptionOptions(beam_size=beam_size)
        self.retries, self.timeout_s = retries, timeout_s

    def _submit(self, image: np.ndarray, encoded: Any = None) -> Any:
        """The Decoder's response for `image`, requested once the Encoder's reply (`encoded`, or a new
        request) is in: a reply handed on unresolved and lost with its node stalls the Decoder call,
        which Serve reroutes forever. The exception instead, if the Encoder failed: retried as one."""
        try:
            features = (encoded or self.encoder.encode_pixels.remote(image)).result(timeout_s=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - raised again where the response is awaited
            return exc
        return self.decoder.caption.remote(features, self.options)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["key"])
        # "" rather than None: an all-None object column would lose its string type in Arrow.
        captions, models = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
        scores = np.full(n, np.nan)
        errors = batch["error"].copy()
        # Every image's Encoder request first, so the Encoders work while Decoder requests go out.
        encoded = {i: self.encoder.encode_pixels.remote(batch["image"][i]) for i in range(n) if errors[i] == ""}
        pending = {i: self._submit(batch["image"][i], reply) for i, reply in encoded.items()}
        for i, response in pending.items():
            for attempt in range(self.retries + 1):
                try:
                    if isinstance(response, Exception):
                        raise response
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


class ChunkWriter:
    """Commits the chunks of each window in listing order, each once all its rows are in: the rows
    as one shard (written atomically), then the progress record with the watermark past the chunk.
    A key's row is taken once: a retried upstream task's repeat is dropped."""

    def __init__(self, cfg: BulkConfig, progress: Progress, uncounted: dict[str, tuple[str, bool]]) -> None:
        self.cfg, self.progress, self.uncounted = cfg, progress, uncounted
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        self.ok = self.failed = self.shards = 0  # committed by this run
        self.window: list[Chunk] = []
        self.rows: list[list[pa.Table]] = []  # per chunk of the window: its rows so far
        self.missing: list[int] = []  # per chunk: rows still to come
        self.index: dict[str, int] = {}  # key still to come -> its chunk in the window
        self.next = 0  # the window's first uncommitted chunk
        self.left = Counter(name for name, _ in uncounted.values())  # uncounted rows per orphan shard
        self.start = self.last_report = time.monotonic()
        progress.next_shard = self._shard_name()
        save_progress(cfg.out, progress)  # before this run's first shard: a kill leaves at most next_shard unrecorded

    def _shard_name(self) -> str:
        return f"part-{self.run_id}-{self.shards:05d}.{self.cfg.format}"

    @property
    def buffered(self) -> int:
        """Rows in, not committed yet."""
        return sum(len(t) for rows in self.rows[self.next :] for t in rows)

    def open(self, window: list[Chunk]) -> None:
        """Take the next window; its chunks with nothing to caption commit at once."""
        self.window, self.next = window, 0
        self.rows = [[] for _ in window]
        self.missing = [len(chunk.todo) for chunk in window]
        self.index = {f.uri: i for i, chunk in enumerate(window) for f in chunk.todo}
        self._commit_ready()

    def add(self, rows: pa.Table) -> None:
        taken = defaultdict(list)  # chunk -> positions of its rows in `rows`
        for position, key in enumerate(rows.column("key").to_pylist()):
            chunk = self.index.pop(key, None)
            if chunk is not None:  # else a retried upstream task's row, already taken
                taken[chunk].append(position)
        for chunk, positions in taken.items():
            self.rows[chunk].append(rows.take(positions))
            self.missing[chunk] -= len(positions)
        self._commit_ready()
        if time.monotonic() - self.last_report > 10:
            self._report()

    def _report(self) -> None:
        self.last_report = time.monotonic()
        rows = self.ok + self.failed + self.buffered
        rate = rows / (self.last_report - self.start)
        print(f"[raycap] bulk: {rows} files captioned ({rate:.1f}/s), {self.failed} errors and {self.shards} shards "
              f"committed, up to {self.progress.watermark}", flush=True)  # fmt: skip

    def close(self) -> None:
        """End the window. Raises RuntimeError if a file of it came back without a row."""
        if self.index:
            raise RuntimeError(
                f"the pipeline returned no row for {len(self.index)} files, e.g. {next(iter(self.index))}: "
                "their chunks and the ones after are not committed; rerun to caption them"
            )

    def _commit_ready(self) -> None:
        while self.next < len(self.window) and self.missing[self.next] == 0:
            self._commit(self.window[self.next], self.rows[self.next])
            self.rows[self.next] = []
            self.next += 1

    def _commit(self, chunk: Chunk, rows: list[pa.Table]) -> None:
        new = sum(len(t) for t in rows)
        failed = sum(1 for t in rows for status in t.column("status").to_pylist() if status == "error")
        if new:
            uri = storage.join(self.cfg.out, RESULTS_DIR, self._shard_name())  # the record's next_shard
            storage.write_bytes(uri, _encode(pa.concat_tables(rows), self.cfg.format))
            self.shards += 1
            self.progress.shards += 1
            self.progress.next_shard = self._shard_name()
        adopted_ok = 0
        for key in chunk.adopted:
            name, ok = self.uncounted.pop(key)
            adopted_ok += ok
            self.left[name] -= 1
        self.progress.orphans = [name for name in self.progress.orphans if self.left[name] > 0]
        self.progress.advance(chunk, new - failed + adopted_ok, failed + len(chunk.adopted) - adopted_ok)
        save_progress(self.cfg.out, self.progress)
        self.ok += new - failed
        self.failed += failed


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


def caption_windows(
    windows: Iterator[list[Chunk]], writer: ChunkWriter, caption: Callable[[list[storage.FileInfo]], Iterable[pa.Table]]
) -> None:
    """Caption the windows one after the other (`caption(files)` gives their rows, in any order),
    listing the next window meanwhile; `writer` commits chunks as their rows come in."""
    with ThreadPoolExecutor(1) as lister:
        upcoming = lister.submit(next, windows, None)
        while (window := upcoming.result()) is not None:
            upcoming = lister.submit(next, windows, None)
            writer.open(window)
            todo = [f for chunk in window for f in chunk.todo]
            for rows in caption(todo) if todo else ():
                writer.add(rows)
            writer.close()


def _count(summary: BulkSummary, planner: Planner, progress: Progress, uncounted: dict[str, tuple[str, bool]]) -> None:
    """Fill the totals: the committed prefix's and the rows it does not count yet, plus this listing's counts."""
    summary.listed += planner.listed
    summary.matched += planner.matched
    summary.todo = planner.todo
    uncounted_ok = sum(ok for _, ok in uncounted.values())
    summary.total_ok = progress.ok + uncounted_ok
    summary.total_failed = progress.failed + len(uncounted) - uncounted_ok
    summary.pending = summary.matched - summary.total_ok - summary.total_failed


def caption_bucket(cfg: BulkConfig) -> BulkSummary:
    """Caption every matching file under `cfg.source` that has no committed row yet; write the rows,
    `progress.json` and `summary.json` under `cfg.out`. Uses the running Ray cluster, or starts one
    (RAY_ADDRESS is honoured), and the running Serve application, or deploys it (`ensure_app`)."""
    start = time.perf_counter()
    cfg = replace(cfg, source=storage.absolute(cfg.source), out=storage.absolute(cfg.out))  # as keys, and for workers
    if not storage.exists(cfg.source):
        raise FileNotFoundError(f"source {cfg.source} does not exist (or holds no file yet)")
    if cfg.checkpoint is not None:  # before Ray: a checkpoint that is not one is one line, not a failed deploy
        from raycap.models.checkpoint import pick_checkpoint  # torch: only when a checkpoint is given

        cfg = replace(cfg, checkpoint=pick_checkpoint(cfg.checkpoint))
    run = plan(cfg)
    progress, uncounted = run.progress, run.uncounted
    summary = BulkSummary(cfg.source, cfg.out, progress.listed, progress.matched,
                          progress.ok + progress.failed + len(uncounted), dry_run=cfg.dry_run)  # fmt: skip
    if cfg.dry_run:
        for _ in run.windows:
            pass
        _count(summary, run.planner, progress, uncounted)
        summary.elapsed_s = time.perf_counter() - start
        return summary
    init_ray()
    served = ensure_app(cfg)
    summary.model, summary.checkpoint = served.name, served.checkpoint
    writer = ChunkWriter(cfg, progress, uncounted)
    after = f" after {progress.watermark}" if progress.watermark else ""
    print(f"[raycap] bulk: captioning the files of {cfg.source}{after} with {served.name} ({served.checkpoint}); "
          f"{summary.already_done} already done", flush=True)  # fmt: skip
    caption_windows(run.windows, writer, lambda todo: _pipeline(cfg, todo, served))
    summary.new_ok, summary.new_failed, summary.shards = writer.ok, writer.failed, writer.shards
    summary.elapsed_s = time.perf_counter() - start
    summary.images_per_s = (writer.ok + writer.failed) / summary.elapsed_s
    _count(summary, run.planner, progress, uncounted)
    data = json.dumps(asdict(summary), indent=2).encode("utf-8")
    storage.write_bytes(storage.join(cfg.out, SUMMARY_FILE), data)
    return summary
