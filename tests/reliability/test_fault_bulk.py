"""Bulk captioning under faults: the job's process killed at random points, and an S3 endpoint that
fails some reads. Either way the final output holds exactly one row per key, and a key whose reads
keep failing is an error row that says so, never a silent gap."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pytest
import ray
from helpers import REPO, deploy_pinned, image, make_checkpoint
from ray import serve

from raycap.bulk import BulkConfig, caption_bucket, read_results, shard_uris

pytestmark = pytest.mark.integration

MAX_LEN = 6
S3_ERROR = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code><Message>injected</Message></Error>"


@pytest.fixture(scope="module")
def app(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    checkpoint = str(make_checkpoint(tmp_path_factory.mktemp("fault_bulk_ckpt"), "fault-model", grid=2, seed=5))
    deploy_pinned(checkpoint, MAX_LEN)
    try:
        yield checkpoint
    finally:
        serve.shutdown()


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _assert_exactly_once(results: pa.Table, expected: set[str]) -> None:
    keys = results.column("key").to_pylist()
    duplicated = [k for k, n in Counter(keys).items() if n > 1]
    assert not duplicated, f"keys with several rows: {duplicated[:5]}"
    assert set(keys) == expected


def _committed(out: Path) -> int:
    return read_results(str(out)).num_rows if out.exists() else 0


@pytest.mark.timeout(420)
def test_three_kills_at_random_points_then_a_rerun_leave_one_row_per_key(app: str, tmp_path: Path) -> None:
    source, out = tmp_path / "photos", tmp_path / "captions"
    files = {f"p{i:03d}.jpg": image(200 + i) for i in range(40)}
    _write(source, files)
    command = [sys.executable, str(REPO / "jobs/caption_bucket.py"), "--source", str(source), "--out", str(out),
               "--clients", "1", "--in-flight", "2", "--read-batch-size", "2", "--rows-per-shard", "1"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    rng = random.Random(7)
    kills = []
    for _ in range(3):
        target = _committed(out) + rng.randint(1, 6)
        job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while _committed(out) < target and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.3))  # anywhere: between shards, mid-write, mid-request
        os.killpg(job.pid, signal.SIGKILL)
        output = job.communicate()[0].decode(errors="replace")
        assert job.returncode == -signal.SIGKILL, f"the job ended before the kill:\n{output[-3000:]}"
        kills.append(_committed(out))
    assert 0 < kills[0] <= kills[1] <= kills[2] < len(files)
    # _committed parsed every visible shard whole. A kill mid-write leaves that write's temp file,
    # which is hidden (dot-prefixed, .tmp) and never listed as a shard.
    shards, leftovers = set(shard_uris(str(out))), list(out.rglob("*.tmp"))
    assert shards and all(p.name.startswith(".") and str(p) not in shards for p in leftovers)
    summary = caption_bucket(BulkConfig(source=str(source), out=str(out), clients=1, in_flight=8))
    assert summary.already_done == kills[-1] and summary.pending == 0
    _assert_exactly_once(read_results(str(out)), {str(source / name) for name in files})
    print(f"rows committed when killed: {kills}; the rerun added {summary.new_ok + summary.new_failed}")


class _FaultyS3Proxy(BaseHTTPRequestHandler):
    """Forwards S3 requests to the real server unchanged (Host included, so signatures still hold),
    but answers 500 InternalError to GET/HEAD of an object named in `faults`, for its first n
    requests (n < 0: always). Counts the requests per faulty object."""

    upstream: str
    faults: dict[str, int]
    seen: Counter
    lock = threading.Lock()

    def _forward(self) -> None:
        name = unquote(urlsplit(self.path).path).rsplit("/", 1)[-1]
        if self.command in ("GET", "HEAD") and name in self.faults:
            with self.lock:
                self.seen[name] += 1
                fail = self.faults[name] < 0 or self.seen[name] <= self.faults[name]
            if fail:
                self.send_response(500)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(S3_ERROR)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(S3_ERROR)
                return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(key, value)
        # A HEAD answer has no body but the object's length, which readers use as its size.
        self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(data)))  # fmt: skip
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.timeout(300)
def test_failing_s3_reads_are_retried_and_a_key_that_keeps_failing_becomes_an_error_row(
    app: str, s3_server, tmp_path: Path
) -> None:
    bucket = s3_server.make_bucket()
    files = {f"f{i:02d}.jpg": image(300 + i) for i in range(10)}
    client = s3_server.client()
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"photos/{name}", Body=data)
    faults = {"f01.jpg": 4, "f02.jpg": 2, "f03.jpg": -1}  # two recover after failures, one never does
    handler = type("Proxy", (_FaultyS3Proxy,), {"upstream": urlsplit(s3_server.endpoint_url).netloc,
                                                 "faults": faults, "seen": Counter()})  # fmt: skip
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    out = tmp_path / "out"
    # A job joining the session's Ray, whose workers were started with AWS_ENDPOINT_URL naming the
    # real server: only --s3-endpoint, handed on by init_ray, sends their reads through the proxy.
    command = [sys.executable, str(REPO / "jobs/caption_bucket.py"), "--source", f"s3://{bucket}/photos",
               "--out", str(out), "--clients", "1", "--in-flight", "4", "--retries", "3",
               "--s3-endpoint", f"http://127.0.0.1:{proxy.server_address[1]}"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    try:
        job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    finally:
        proxy.shutdown()
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    results = read_results(str(out))
    prefix = f"s3://{bucket}/photos"
    _assert_exactly_once(results, {f"{prefix}/{name}" for name in files})
    rows = {r["key"].rsplit("/", 1)[-1]: r for r in results.to_pylist()}
    assert rows["f01.jpg"]["status"] == "ok" and rows["f02.jpg"]["status"] == "ok"
    assert rows["f03.jpg"]["status"] == "error" and "could not read: " in rows["f03.jpg"]["error"]
    assert rows["f03.jpg"]["error"].endswith("(after 4 attempts)")
    assert all(rows[n]["status"] == "ok" for n in files if n not in faults)
    assert handler.seen["f01.jpg"] > 4 and handler.seen["f03.jpg"] >= 4  # retried, then given up
    assert (summary["total_ok"], summary["total_failed"]) == (9, 1)
    print(f"requests to the failing objects: {dict(handler.seen)}")
