"""Deploying the Serve application from Python, as `serve run serve_config.yaml` does: the config
file loaded and validated with overrides (`load_config`), applied and waited for (`deploy`), and
its replicas counted (`replica_counts`). Used by jobs/serve.py, the bulk job, benches and tests;
jobs/serve.py also checks the HTTP port before Ray starts (`check_port_free`) and serves until
the application is stopped (`wait_until_stopped`).
`deploy` hands the replicas this process's S3 endpoint (`raycap.storage.worker_env`) in the
application's runtime_env, so they read an s3:// checkpoint from it even when Serve's controller
was started by another job, whose workers have another environment. A deployment that fails on a
user error (USER_ERRORS in a replica or the application's builder: a checkpoint that does not load,
an unreadable token file, a bad setting) raises it as one line; other failures, bugs, with Serve's
whole message, tracebacks included.

    url = deploy(load_config("serve_config.yaml", checkpoint="s3://bucket/models/attention"))
"""

import errno
import pydoc
import re
import socket
import time
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, ServeDeploySchema

from raycap import storage
from raycap.config import USER_ERRORS
from raycap.serve_schema import APP_NAME

PORTS = range(1, 65536)
# The line that ends a Python traceback, "module.Error: message" (Ray writes "RayTaskError(Error): ...").
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\()?([A-Za-z_][\w.]*)\)?: (.*)$")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `override`, dicts merged key by key; a None value removes the key."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path,
    checkpoint: str | None = None,
    port: int | None = None,
    overrides: dict[str, Any] | None = None,
    models: dict[str, str] | None = None,
) -> ServeDeploySchema:
    """A config file for this application, validated by Ray Serve's own schema, with overrides:
    `checkpoint` for both Encoder and Decoder (served as one model), or `models` (name -> checkpoint,
    the first the default, whose checkpoint the Encoder reads), the HTTP `port`, and `overrides`
    merged into the application entry (`deployments` by name, e.g. {"deployments": {"Decoder":
    {"num_replicas": 1}}})."""
    raw = yaml.safe_load(Path(path).read_text())
    apps = raw.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{path}: expected exactly one application, found {len(apps)}")
    app = dict(apps[0])
    extra = dict(overrides or {})
    by_name = extra.pop("deployments", {})
    if checkpoint is not None and models:
        raise ValueError("pass checkpoint (one model) or models (several), not both")
    served: dict[str, Any] = {}  # None drops a key of the file's user_config: the other way of naming models
    if models:
        decoder = {"models": models, "default_model": next(iter(models)), "checkpoint": None, "model_name": None}
        encoder = {"checkpoint": next(iter(models.values()))}
        served = {"Encoder": {"user_config": encoder}, "Decoder": {"user_config": decoder}}
    elif checkpoint is not None:
        decoder = {"checkpoint": checkpoint, "models": None, "default_model": None}
        served = {"Encoder": {"user_config": {"checkpoint": checkpoint}}, "Decoder": {"user_config": decoder}}
    app = _merge(app, extra)
    deployments = {d["name"]: d for d in app.get("deployments", [])}
    for layer in (served, by_name):
        for name, options in layer.items():
            deployments[name] = _merge(deployments.get(name, {"name": name}), options)
    app["deployments"] = list(deployments.values())
    if port is not None:
        raw = _merge(raw, {"http_options": {"port": port}})
    config = ServeDeploySchema.model_validate({**raw, "applications": [app]})
    if config.http_options.port not in PORTS:  # Serve takes any integer, and its proxy fails to bind minutes later
        raise ValueError(
            f"HTTP port {config.http_options.port} is out of range: give a port from 1 to 65535 "
            f"(--port, or http_options.port in {path})"
        )
    return config


def check_port_free(config: ServeDeploySchema) -> None:
    """Raise OSError when this machine cannot listen on the config's HTTP host and port: for a job
    about to start a local Ray, whose Serve proxy would otherwise fail to bind minutes later."""
    host, port = config.http_options.host, config.http_options.port
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Serve's proxy: TIME_WAIT is no use
            probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(
                f"port {port} on {host} is in use (another server, or another Serve): pass --port N for a free port"
            ) from None
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): check http_options.host, "
                      "or pass --port N") from None  # fmt: skip


def _with_endpoint(config: ServeDeploySchema) -> ServeDeploySchema:
    """`config` with this process's S3 endpoint among each application's runtime_env env_vars
    (a value the file sets itself wins)."""
    env = storage.worker_env()
    if not env:
        return config
    raw = config.model_dump(exclude_unset=True)
    for app in raw["applications"]:
        app["runtime_env"] = _merge({"env_vars": env}, app.get("runtime_env") or {})
    return ServeDeploySchema.model_validate(raw)


def deploy(config: ServeDeploySchema, timeout_s: float = 300.0) -> str:
    """Apply `config` to the Ray this process is connected to, as `serve run serve_config.yaml` does,
    with this process's S3 endpoint for the replicas, wait until its application runs, and return
    its base URL. ValueError when a Serve already running there has another HTTP host or port
    (Serve would keep its own and ignore the config's), or for a user error while deploying."""
    # Serve has no public Python call that applies a config file; this is the CLI's own path
    # (ray/serve/scripts.py: serve_start, then deploy_apps), and serve_start's way to a running Serve.
    from ray.serve._private.api import serve_start
    from ray.serve.context import _get_global_client

    wanted = config.http_options
    running = _get_global_client(raise_if_no_controller_running=False)
    if running is not None and (running.http_config.host, running.http_config.port) != (wanted.host, wanted.port):
        have = running.http_config
        raise ValueError(
            f"Serve already runs on this Ray cluster with HTTP on {have.host}:{have.port}, not {wanted.host}:"
            f"{wanted.port}, and keeps it while it runs: use port {have.port}, or stop Serve first (serve shutdown -y)"
        )
    config = _with_endpoint(config)
    client = serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=config.grpc_options.model_dump(),
    )
    client.deploy_apps(config)
    app = config.applications[0]
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app.name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            break
        if status is not None and status.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise _failure(app.name, status)
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {app.name!r} not running after {timeout_s:.0f} s: {status}")
        time.sleep(0.5)
    host = config.http_options.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{config.http_options.port}{(app.route_prefix or '/').rstrip('/')}"


def _user_error(message: str) -> str | None:
    """The message of the exception that ends the traceback in `message` (with any lines that follow
    it, joined), when its class is a user error (USER_ERRORS); else None."""
    lines = message.rstrip().splitlines()
    for i in reversed(range(len(lines))):
        match = _EXCEPTION_LINE.match(lines[i])
        if match:
            kind = pydoc.locate(match[1])  # the replica's exception class, imported here by its name
            if isinstance(kind, type) and issubclass(kind, USER_ERRORS):
                return " ".join([match[2], *(line.strip() for line in lines[i + 1 :])])
            return None
    return None


def _failure(app: str, status: ApplicationStatusOverview) -> Exception:
    """The error of an application that failed to deploy: a user error raised in its builder or a
    replica as a one-line ValueError naming where; anything else as Serve's messages, in full."""
    messages = {"": status.message, **{name: d.message for name, d in status.deployments.items()}}
    for where, message in messages.items():
        cause = _user_error(message or "")
        if cause:
            return ValueError(f"application {app!r} failed to deploy: {f'{where}: ' if where else ''}{cause}")
    causes = "; ".join(f"{name}: {d.message}" for name, d in status.deployments.items() if d.message)
    return RuntimeError(f"application {app!r} failed to deploy: {status.message} {causes}".rstrip())


def wait_until_stopped(app_name: str = APP_NAME, poll_s: float = 2.0, settle_polls: int = 5) -> None:
    """Return once the application is gone from elsewhere: Serve shut down (`serve shutdown -y`),
    or the application deleted and Serve still up `settle_polls` polls later. Not sooner: the
    shutdown's caller waits for Serve's controller to end, and a job's own Ray, which may run the
    dashboard answering it, stops with the job. Ctrl-C meanwhile raises KeyboardInterrupt, as ever."""
    polls_without_app = 0
    while polls_without_app <= settle_polls:
        time.sleep(poll_s)
        try:
            listed = app_name in serve.status().applications
        except RayActorError:  # the controller is gone: Serve was shut down
            return
        polls_without_app = 0 if listed else polls_without_app + 1


def replica_counts(app_name: str = APP_NAME) -> dict[str, int]:
    """Running replicas per deployment of an application (for watching autoscaling)."""
    status = serve.status().applications.get(app_name)
    if status is None:
        return {}
    return {name: d.replica_states.get("RUNNING", 0) for name, d in status.deployments.items()}
