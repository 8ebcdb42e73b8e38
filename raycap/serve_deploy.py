"""Deploying the Serve application from Python, as `serve run serve_config.yaml` does: the config
file loaded and validated with overrides (`load_config`), applied and waited for (`deploy`), and
its replicas counted (`replica_counts`). Used by jobs/serve.py, the bulk job, benches and tests.
`deploy` hands the replicas this process's S3 endpoint (`raycap.storage.worker_env`) in the
application's runtime_env, so they read an s3:// checkpoint from it even when Serve's controller
was started by another job, whose workers have another environment.

    url = deploy(load_config("serve_config.yaml", checkpoint="s3://bucket/models/attention"))
"""

import time
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from raycap import storage
from raycap.serve_schema import APP_NAME


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
    return ServeDeploySchema.model_validate({**raw, "applications": [app]})


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
    its base URL."""
    # Serve has no public Python call that applies a config file; this is the CLI's own path
    # (ray/serve/scripts.py: serve_start, then deploy_apps).
    from ray.serve._private.api import serve_start

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
            causes = "; ".join(f"{name}: {d.message}" for name, d in status.deployments.items() if d.message)
            raise RuntimeError(f"application {app.name!r} failed to deploy: {status.message} {causes}".rstrip())
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {app.name!r} not running after {timeout_s:.0f} s: {status}")
        time.sleep(0.5)
    host = config.http_options.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{config.http_options.port}{(app.route_prefix or '/').rstrip('/')}"


def replica_counts(app_name: str = APP_NAME) -> dict[str, int]:
    """Running replicas per deployment of an application (for watching autoscaling)."""
    status = serve.status().applications.get(app_name)
    if status is None:
        return {}
    return {name: d.replica_states.get("RUNNING", 0) for name, d in status.deployments.items()}
