"""Session fixtures shared by the test modules.

``s3_server`` runs a real S3-compatible server (SeaweedFS, ``seaweed.running_s3_server``) on
loopback, with an access key like a user's bucket, and points the standard AWS env vars at it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from seaweed import S3Server, running_s3_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on loopback for the whole session.

    Sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL / AWS_REGION (restored at
    the end) so code under test, and Ray workers started afterwards, find it through the standard
    credential chain. Request this fixture before starting Ray so workers inherit the env.
    """
    with running_s3_server(tmp_path_factory.mktemp("seaweedfs")) as server, pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "RAYCAP_S3_ENDPOINT"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        mp.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
        mp.setenv("AWS_REGION", "us-east-1")
        yield server


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
    """`helpers.tiny_features`, extracted once for the training tests."""
    from helpers import tiny_features

    return tiny_features(tmp_path_factory.mktemp("tiny_features"))
