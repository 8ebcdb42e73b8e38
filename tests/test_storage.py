"""raycap.storage: local paths (fast unit tests) and s3:// against the session's SeaweedFS server."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raycap import storage
from raycap.storage import FileInfo


def test_is_s3() -> None:
    assert storage.is_s3("s3://bucket/key")
    assert not storage.is_s3("/data/s3://x")
    assert not storage.is_s3("images")


@pytest.fixture
def no_endpoint(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No S3 endpoint set; what the test sets, set_endpoint included, is undone after it (an empty
    variable counts as unset, and setenv records the variable for restoring)."""
    for var in (storage.ENDPOINT_ENV, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(var, "")
    return monkeypatch


def test_endpoint_prefers_the_flag_then_the_s3_specific_env(no_endpoint: pytest.MonkeyPatch) -> None:
    assert storage.endpoint() is None and storage.worker_env() == {}
    no_endpoint.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert storage.endpoint() == "http://generic:1"
    no_endpoint.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:2")
    assert storage.endpoint() == "http://s3only:2"
    storage.set_endpoint("http://flag:3")
    assert storage.endpoint() == "http://flag:3"
    assert storage.worker_env() == {storage.ENDPOINT_ENV: "http://flag:3"}  # what init_ray hands to workers


@pytest.mark.parametrize("var", [storage.ENDPOINT_ENV, "AWS_ENDPOINT_URL"])
def test_a_malformed_endpoint_is_refused_naming_where_it_came_from(no_endpoint: pytest.MonkeyPatch, var: str) -> None:
    no_endpoint.setenv(var, "127.0.0.1:9000")
    with pytest.raises(ValueError, match=f"127.0.0.1:9000.*from {var}.*http://host:port"):
        storage.filesystem("s3://bucket/key")
    with pytest.raises(ValueError, match="from --s3-endpoint"):
        storage.set_endpoint("minio:9000")


def test_filesystem_local_gives_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = storage.filesystem("out/a.parquet")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "out" / "a.parquet")


def test_filesystem_s3_gives_bucket_key_and_caches_per_endpoint(no_endpoint: pytest.MonkeyPatch) -> None:
    storage.set_endpoint("http://127.0.0.1:1")
    fs, path = storage.filesystem("s3://bucket/dir/key.jpg/")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/dir/key.jpg"
    assert storage.filesystem("s3://other")[0] is fs
    storage.set_endpoint("http://127.0.0.1:2")
    assert storage.filesystem("s3://bucket")[0] is not fs


def test_filesystem_rejects_a_uri_without_bucket() -> None:
    with pytest.raises(ValueError, match="names no bucket"):
        storage.filesystem("s3://")


@pytest.mark.parametrize(
    "base, parts, expected",
    [
        ("s3://bucket", ("a", "b.jpg"), "s3://bucket/a/b.jpg"),
        ("s3://bucket/out/", ("x/y.parquet",), "s3://bucket/out/x/y.parquet"),
        ("/data", ("./a//b",), "/data/a/b"),
        ("results", ("part-0.parquet",), "results/part-0.parquet"),
        ("/", ("a",), "/a"),
        ("s3://bucket/out", (), "s3://bucket/out"),
    ],
)
def test_join(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert storage.join(base, *parts) == expected


@pytest.mark.parametrize("part", ["..", "../x", "a/../../b", "a/..", "/etc/passwd"])
def test_join_rejects_parts_escaping_the_base(part: str) -> None:
    with pytest.raises(ValueError, match="unsafe path"):
        storage.join("s3://bucket/out", "ok", part)


def test_local_write_creates_parents_and_reads_back(tmp_path: Path) -> None:
    uri = str(tmp_path / "a" / "b" / "c.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")
    assert storage.exists(uri)
    assert storage.exists(str(tmp_path / "a"))
    assert storage.read_bytes(uri) == b"two"


def test_local_write_leaves_no_temp_files(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "x.txt"), b"data")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):  # os.replace cannot put a file over a directory
        storage.write_bytes(str(tmp_path / "taken"), b"data")
    assert sorted(os.listdir(tmp_path)) == ["taken", "x.txt"]
    assert os.listdir(tmp_path / "taken") == []


def test_local_write_respects_umask(tmp_path: Path) -> None:
    uri = tmp_path / "f"
    storage.write_bytes(str(uri), b"")
    umask = os.umask(0)
    os.umask(umask)
    assert uri.stat().st_mode & 0o777 == 0o666 & ~umask


def test_list_files_local_is_recursive_sorted_and_filters_suffixes(tmp_path: Path) -> None:
    for name in ["b.jpg", "a/c.JPG", "a/d.png", "a/e.txt"]:
        storage.write_bytes(str(tmp_path / name), b"12")
    got = storage.list_files(str(tmp_path), suffixes=[".jpg", ".png"])
    assert got == [FileInfo(str(tmp_path / n), 2) for n in ["a/c.JPG", "a/d.png", "b.jpg"]]
    assert len(storage.list_files(str(tmp_path))) == 4


def test_missing_local_paths_raise_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        storage.list_files(str(tmp_path / "nope"))


def test_ensure_dir_creates_local_dirs_and_ignores_s3(tmp_path: Path) -> None:
    storage.ensure_dir(str(tmp_path / "x" / "y"))
    assert (tmp_path / "x" / "y").is_dir()
    storage.ensure_dir("s3://bucket/prefix")


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.make_bucket()


@pytest.mark.integration
def test_s3_write_read_exists(bucket: str) -> None:
    uri = f"s3://{bucket}/dir/obj.bin"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00payload")
    assert storage.read_bytes(uri) == b"\x00payload"
    assert storage.exists(uri)
    assert storage.exists(f"s3://{bucket}/dir")
    assert storage.exists(f"s3://{bucket}")


@pytest.mark.integration
def test_s3_storage_and_boto3_see_the_same_objects(bucket: str) -> None:
    client = storage.s3_client()  # endpoint and credentials from the env, like a user's setup
    storage.write_bytes(f"s3://{bucket}/from-arrow", b"a")
    assert client.get_object(Bucket=bucket, Key="from-arrow")["Body"].read() == b"a"
    client.put_object(Bucket=bucket, Key="from-boto/x", Body=b"b")
    assert storage.read_bytes(f"s3://{bucket}/from-boto/x") == b"b"


@pytest.mark.integration
def test_s3_list_files_lists_objects_under_the_prefix_only(bucket: str) -> None:
    for key in ["img/b.jpg", "img/sub/a.JPG", "img/sub/notes.txt", "img2/c.jpg"]:
        storage.write_bytes(f"s3://{bucket}/{key}", key.encode())
    got = storage.list_files(f"s3://{bucket}/img", suffixes=[".jpg"])
    assert got == [FileInfo(f"s3://{bucket}/img/b.jpg", 9), FileInfo(f"s3://{bucket}/img/sub/a.JPG", 13)]
    assert [f.uri for f in storage.list_files(f"s3://{bucket}/")] == [
        f"s3://{bucket}/{k}" for k in ["img/b.jpg", "img/sub/a.JPG", "img/sub/notes.txt", "img2/c.jpg"]
    ]


@pytest.mark.integration
def test_s3_missing_bucket_errors_name_bucket_and_endpoint(s3_server) -> None:
    uri = "s3://no-such-bucket-raycap/x.bin"
    for call in (
        lambda: storage.read_bytes(uri),
        lambda: storage.write_bytes(uri, b"x"),
        lambda: storage.list_files("s3://no-such-bucket-raycap/x"),
    ):
        with pytest.raises(FileNotFoundError, match="no-such-bucket-raycap") as info:
            call()
        assert s3_server.endpoint_url in str(info.value)
        assert "AWS_ENDPOINT_URL" in str(info.value)
    assert not storage.exists(uri)


@pytest.mark.integration
def test_s3_missing_key_raises_file_not_found_naming_uri(bucket: str) -> None:
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/missing.bin does not exist"):
        storage.read_bytes(f"s3://{bucket}/missing.bin")


@pytest.mark.integration
def test_s3_wrong_credentials_raise_permission_error(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{bucket}/k"
    storage.write_bytes(uri, b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(PermissionError, match="AWS_ACCESS_KEY_ID"):
        storage.read_bytes(uri)
    with pytest.raises(PermissionError, match=uri):
        storage.write_bytes(uri, b"y")


@pytest.mark.integration
def test_set_endpoint_overrides_the_aws_env(s3_server, bucket: str, no_endpoint: pytest.MonkeyPatch) -> None:
    no_endpoint.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    storage.set_endpoint(s3_server.endpoint_url)  # as --s3-endpoint does
    uri = f"s3://{bucket}/k"
    storage.write_bytes(uri, b"x")
    assert storage.read_bytes(uri) == b"x"
    assert storage.s3_client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"x"


@pytest.mark.integration
def test_parquet_round_trip_through_filesystem(bucket: str) -> None:
    table = pa.table({"image": ["a.jpg", "b.jpg"], "caption": ["a dog", "two cats"]})
    fs, path = storage.filesystem(f"s3://{bucket}/captions/part-0.parquet")
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert [f.uri for f in storage.list_files(f"s3://{bucket}/captions", suffixes=[".parquet"])] == [
        f"s3://{bucket}/captions/part-0.parquet"
    ]
