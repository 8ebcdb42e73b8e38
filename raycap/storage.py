"""Local paths and s3:// URIs behind one small API, shared by every stage.

S3 access uses the standard AWS credential chain (env vars, profile, instance role). The S3
endpoint (an S3-compatible server: MinIO, SeaweedFS, ...) is process configuration, read here and
nowhere else: a job's ``--s3-endpoint`` sets it (:func:`set_endpoint`), else ``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL`` name it, else it is AWS. ``raycap.runtime.init_ray`` hands it to every Ray
worker (:func:`worker_env`). pyarrow's S3FileSystem ignores the AWS variables, so this module
passes the endpoint to it (and to boto3) itself.
"""

from __future__ import annotations

import functools
import itertools
import os
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote_plus, urlsplit

import boto3
import pyarrow.fs as pafs
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

_S3 = "s3://"
ENDPOINT_ENV = "RAYCAP_S3_ENDPOINT"  # what --s3-endpoint sets and Ray's workers receive
_ENDPOINT_VARS = (ENDPOINT_ENV, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the first one set wins
# Markers in pyarrow's S3 error messages (AWS error names as pyarrow spells them), and boto3's codes.
_DENIED = ("ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "EXPIRED_TOKEN")
_DENIED_CODES = ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken")
PAGE_SIZE = 1000  # files per page of list_pages: ListObjectsV2's most (and default)
_S3_XML = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class FileInfo(NamedTuple):
    """A file found by :func:`list_files`."""

    uri: str
    size: int


def is_s3(uri: str) -> bool:
    """True for ``s3://bucket/key`` URIs, False for local paths."""
    return uri.startswith(_S3)


def _checked(url: str, source: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"S3 endpoint {url!r} (from {source}) is not a URL like http://host:port")
    return url


def endpoint() -> str | None:
    """This process's S3 endpoint URL: the first of RAYCAP_S3_ENDPOINT (``--s3-endpoint``),
    AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL that is set, else None (AWS itself)."""
    for var in _ENDPOINT_VARS:
        if url := os.environ.get(var):
            return _checked(url, var)
    return None


def set_endpoint(url: str) -> None:
    """Make ``url`` this process's S3 endpoint, ahead of the AWS variables (a job's ``--s3-endpoint``);
    ``raycap.runtime.init_ray`` hands it on to Ray's workers."""
    os.environ[ENDPOINT_ENV] = _checked(url, "--s3-endpoint")


def worker_env() -> dict[str, str]:
    """Environment variables that give a Ray worker this process's S3 endpoint (none for AWS)."""
    url = endpoint()
    return {ENDPOINT_ENV: url} if url else {}


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = uri[len(_S3) :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket: expected s3://bucket/key")
    return bucket, key.strip("/")


@functools.lru_cache(maxsize=None)
def _s3_filesystem(url: str | None, region: str) -> pafs.S3FileSystem:
    if url is None:
        return pafs.S3FileSystem(region=region)
    parts = urlsplit(url)
    return pafs.S3FileSystem(endpoint_override=parts.netloc, scheme=parts.scheme, region=region)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for ``uri`` and the path to pass it (``bucket/key`` or an absolute path)."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    bucket, key = _split_s3(uri)
    return _s3_filesystem(endpoint(), _region()), f"{bucket}/{key}".rstrip("/")


def absolute(uri: str) -> str:
    """``uri`` unchanged if it is s3://, else as an absolute local path (``~`` expanded): paths that
    travel to Ray workers must not depend on the worker's current directory."""
    return uri if is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def s3_client() -> BaseClient:
    """A boto3 S3 client for the same endpoint, region and credential chain as :func:`filesystem`."""
    url = endpoint()
    # Path-style addressing: custom endpoints rarely resolve bucket.host names.
    config = Config(s3={"addressing_style": "path"}) if url else None
    return boto3.client("s3", endpoint_url=url, region_name=_region(), config=config)


def join(base: str, *parts: str) -> str:
    """``base`` (a directory or s3:// prefix) joined with relative ``parts``.

    Raises ValueError for absolute parts or ``..`` components, so a key taken from input data
    can never escape ``base``.
    """
    segments = []
    for part in parts:
        if part.startswith("/") or ".." in part.split("/"):
            raise ValueError(f"unsafe path {part!r}: parts joined to {base!r} must be relative, without '..'")
        segments += [s for s in part.split("/") if s not in ("", ".")]
    if not segments:
        return base
    return (base if base.endswith("/") else base + "/") + "/".join(segments)


def _where() -> str:
    url = endpoint()
    return f"endpoint {url}" if url else "AWS S3 (set --s3-endpoint or AWS_ENDPOINT_URL for another S3 server)"


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Re-raise pyarrow's and boto3's S3 errors naming the URI, the endpoint and what to check."""
    try:
        yield
    except (OSError, ClientError, BotoCoreError) as e:
        if not is_s3(uri):
            raise
        msg = str(e)
        code = e.response.get("Error", {}).get("Code", "") if isinstance(e, ClientError) else ""
        bucket, _ = _split_s3(uri)
        if (
            code == "NoSuchBucket"
            or "NO_SUCH_BUCKET" in msg
            or (isinstance(e, FileNotFoundError) and not _bucket_exists(bucket))
        ):
            raise FileNotFoundError(
                f"bucket {bucket!r} of {uri} does not exist at {_where()}: "
                "create it, or fix the URI or the endpoint (--s3-endpoint, AWS_ENDPOINT_URL)"
            ) from e
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"{uri} does not exist at {_where()}") from e
        if code in _DENIED_CODES or any(marker in msg for marker in _DENIED):
            raise PermissionError(
                f"access to {uri} denied at {_where()}: check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and their permissions on the bucket"
            ) from e
        raise OSError(f"S3 request for {uri} failed at {_where()}: {msg}") from e


def _bucket_exists(bucket: str) -> bool:
    """Best effort: True unless the bucket is known to be missing."""
    try:
        info = _s3_filesystem(endpoint(), _region()).get_file_info(bucket)
    except OSError:  # e.g. not allowed to look: don't claim it is missing
        return True
    return info.type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """The whole content of a file or object."""
    fs, path = filesystem(uri)
    with _s3_errors(uri), fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` atomically: readers see the old content or the new, never a partial file."""
    fs, path = filesystem(uri)
    if is_s3(uri):  # an S3 object appears only once its upload completes
        with _s3_errors(uri), fs.open_output_stream(path) as f:
            f.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace is a rename on one filesystem; the .tmp suffix keeps
    # leftovers of a crash out of suffix-filtered listings.
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def exists(uri: str) -> bool:
    """True if a file, directory, object or prefix exists at ``uri``."""
    fs, path = filesystem(uri)
    with _s3_errors(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_pages(prefix: str, start_after: str | None = None, page_size: int = PAGE_SIZE) -> Iterator[list[FileInfo]]:
    """Files under ``prefix`` (recursive) in listing order, up to ``page_size`` at a time, only those
    after the URI ``start_after`` when given: nothing lists the whole prefix at once.

    S3: one ListObjectsV2 request a page, in the server's order (AWS: the keys' UTF-8 bytes;
    SeaweedFS lists a folder's files before a sibling like ``a.b`` of folder ``a``), resumed after
    ``start_after`` by the server itself. Local: a walk in UTF-8 byte order of the paths, one
    folder's entries in memory at a time. Raises FileNotFoundError for a missing bucket or folder.
    """
    if is_s3(prefix):
        yield from _s3_pages(prefix, start_after, page_size)
        return
    files = _local_files(filesystem(prefix)[1], start_after)
    while page := list(itertools.islice(files, page_size)):
        yield page


def _raw_body(response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any) -> None:
    """botocore's XML parser costs about 0.1 ms a listed key (dateutil for each timestamp), five
    times the request itself: a successful listing's body is handed over unparsed instead."""
    if response_dict["status_code"] == 200:
        customized_response_dict["RawBody"], response_dict["body"] = response_dict["body"], b""


def _s3_pages(prefix: str, start_after: str | None, page_size: int) -> Iterator[list[FileInfo]]:
    bucket, key = _split_s3(prefix)
    client = s3_client()
    client.meta.events.register("before-parse.s3.ListObjectsV2", _raw_body)
    request = {"Bucket": bucket, "Prefix": f"{key}/" if key else "", "EncodingType": "url", "MaxKeys": page_size}
    if start_after is not None:
        request["StartAfter"] = _split_s3(start_after)[1]
    base = f"{_S3}{bucket}/"
    while True:
        with _s3_errors(prefix):
            page = ET.fromstring(client.list_objects_v2(**request)["RawBody"])
        decode = unquote_plus if page.findtext(f"{_S3_XML}EncodingType") == "url" else str
        files = []
        for entry in page.iterfind(f"{_S3_XML}Contents"):
            name = decode(entry.findtext(f"{_S3_XML}Key", ""))
            if not name.endswith("/"):  # a folder marker, not a file
                files.append(FileInfo(base + name, int(entry.findtext(f"{_S3_XML}Size", "0"))))
        if files:
            yield files
        token = page.findtext(f"{_S3_XML}NextContinuationToken")
        if page.findtext(f"{_S3_XML}IsTruncated") != "true" or not token:
            return
        request["ContinuationToken"] = token


def _local_files(folder: str, start_after: str | None) -> Iterator[FileInfo]:
    """Files under ``folder`` in UTF-8 byte order of their paths (S3's), after ``start_after``:
    a sub-folder sorts as its name plus "/", so ``a.b`` comes before ``a/x``; a sub-folder wholly at
    or before ``start_after`` is skipped unread. Symlinked folders are not followed."""
    entries = []
    with os.scandir(folder) as scan:
        for entry in scan:
            is_dir = entry.is_dir(follow_symlinks=False)
            entries.append((entry.name + "/" if is_dir else entry.name, is_dir, entry))
    entries.sort(key=lambda e: e[0])  # code point order: UTF-8's byte order
    for _, is_dir, entry in entries:
        path = entry.path
        if is_dir:
            inner = path + "/"
            if start_after is None or start_after < inner:
                yield from _local_files(path, None)
            elif start_after.startswith(inner):
                yield from _local_files(path, start_after)
        elif (start_after is None or path > start_after) and entry.is_file():
            yield FileInfo(path, entry.stat().st_size)


def list_files(prefix: str, suffixes: Sequence[str] | None = None) -> list[FileInfo]:
    """Files under ``prefix`` (recursive), optionally only those ending in ``suffixes``
    (case-insensitive), sorted by URI.

    Raises FileNotFoundError if ``prefix`` does not exist; an S3 prefix exists once it holds an object.
    """
    ends = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    pages = list(list_pages(prefix))
    if not pages and is_s3(prefix) and _split_s3(prefix)[1]:
        raise FileNotFoundError(f"{prefix} does not exist at {_where()}")
    files = [f for page in pages for f in page if ends is None or f.uri.lower().endswith(ends)]
    return sorted(files, key=lambda f: f.uri)


def relative_keys(prefix: str, uris: Sequence[str]) -> list[str]:
    """Each URI of :func:`list_files` under ``prefix`` as a key relative to it (``a/b.jpg``)."""
    base = filesystem(prefix)[1].rstrip("/") + "/"
    return [filesystem(uri)[1][len(base) :] for uri in uris]


def ensure_dir(uri: str) -> None:
    """Create a local directory and its parents; S3 needs none, so a no-op there."""
    if not is_s3(uri):
        os.makedirs(filesystem(uri)[1], exist_ok=True)
