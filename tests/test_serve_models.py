"""Several models served at once (Serve model multiplexing): the repo's serve_config.yaml deployed on
the session's Ray with two checkpoints on one trunk, called over real HTTP on 127.0.0.1. Each model
answers with its own captions and names itself; an unknown one gets 404 with the list; swapping one
model's checkpoint under load drops nothing; models on different trunks are refused at deploy time."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from helpers import PINNED, SERVE_CONFIG, free_port, image, job_module, make_checkpoint, swap_under_load
from ray import serve

from raycap.bulk import BulkConfig, caption_bucket, read_results
from raycap.serve import DecoderSettings, check_one_trunk
from raycap.serve_deploy import deploy, load_config

MAX_LEN = 12
PHOTOS = [image(seed) for seed in range(8)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`alpha`, `beta` and `beta2` share one trunk (grids 4, 2, 4); `other` has its own."""
    root = tmp_path_factory.mktemp("models")
    made = {
        "alpha": make_checkpoint(root, "alpha", grid=4, seed=0, trunk="shared"),
        "beta": make_checkpoint(root, "beta", grid=2, seed=1, trunk="shared"),
        "beta2": make_checkpoint(root, "beta2", grid=4, seed=2, trunk="shared"),
        "other": make_checkpoint(root, "other", grid=4, seed=3),
    }
    return {name: str(path) for name, path in made.items()}


def _deploy(models: dict[str, str], port: int) -> str:
    overrides = {
        "deployments": {"Encoder": PINNED, "Decoder": {**PINNED, "user_config": {"max_decode_len": MAX_LEN}}},
        "logging_config": {"enable_access_log": False},
    }
    return deploy(load_config(SERVE_CONFIG, port=port, overrides=overrides, models=models))


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def service(ray_session: None, checkpoints: dict[str, str], port: int) -> Iterator[str]:
    """alpha (the default) and beta, deployed once for this module; yields the base URL."""
    url = _deploy({"alpha": checkpoints["alpha"], "beta": checkpoints["beta"]}, port)
    try:
        yield url
    finally:
        serve.shutdown()


def _caption(url: str, photo: bytes, **params: str) -> requests.Response:
    return requests.post(f"{url}/caption", data=photo, params=params, timeout=60)


def _info(url: str, model: str) -> dict:
    return requests.get(f"{url}/model", params={"model": model}, timeout=30).json()


# --- no Ray --------------------------------------------------------------------------------------


def test_settings_take_one_checkpoint_or_named_models_with_a_known_default() -> None:
    one = DecoderSettings.model_validate({"checkpoint": "s3://b/runs/attention/"})
    assert (one.table(), one.default()) == ({"attention": "s3://b/runs/attention/"}, "attention")
    two = DecoderSettings.model_validate({"models": {"gru": "/g", "attention": "/a"}, "default_model": "attention"})
    assert (list(two.table()), two.default()) == (["gru", "attention"], "attention")
    with pytest.raises(ValueError, match="not among the models"):
        DecoderSettings.model_validate({"models": {"gru": "/g"}, "default_model": "attention"})
    with pytest.raises(ValueError, match="either checkpoint"):
        DecoderSettings.model_validate({"checkpoint": "/a", "models": {"gru": "/g"}})


def test_serve_job_takes_named_models_or_one_checkpoint() -> None:
    serve_job = job_module("serve")
    a = serve_job.parse_args(["--model", "attention=/r/a", "--model", "gru=s3://b/g=1"])
    assert serve_job._models(a.models) == {"attention": "/r/a", "gru": "s3://b/g=1"}
    with pytest.raises(ValueError, match="NAME=CHECKPOINT with a new NAME"):
        serve_job._models(["attention=/r/a", "attention=/r/b"])
    with pytest.raises(SystemExit):  # not both
        serve_job.parse_args(["--checkpoint", "/r/a", "--model", "gru=/r/g"])
    loaded = load_config(SERVE_CONFIG, models=serve_job._models(a.models))
    user_configs = {d.name: d.user_config for d in loaded.applications[0].deployments}
    assert user_configs["Encoder"]["checkpoint"] == "/r/a"
    decoder = DecoderSettings.model_validate(user_configs["Decoder"])
    assert (decoder.table(), decoder.default(), decoder.checkpoint) == (serve_job._models(a.models), "attention", None)


def test_models_on_different_trunks_are_refused_by_name(checkpoints: dict[str, str]) -> None:
    check_one_trunk({"alpha": checkpoints["alpha"], "beta": checkpoints["beta"]})  # grids differ: fine
    with pytest.raises(ValueError, match="different encoders") as refused:
        check_one_trunk({"alpha": checkpoints["alpha"], "other": checkpoints["other"]})
    assert "alpha: resnet18" in str(refused.value) and "other: resnet18" in str(refused.value)


# --- served ----------------------------------------------------------------------------------------


def test_models_lists_them_with_the_default(service: str, checkpoints: dict[str, str]) -> None:
    body = requests.get(f"{service}/models", timeout=30).json()
    served = [{"name": name, "checkpoint": checkpoints[name]} for name in ("alpha", "beta")]
    assert body == {"models": served, "default": "alpha"}


def test_two_models_answer_differently_for_the_same_image(service: str) -> None:
    alpha = [_caption(service, photo, model="alpha").json() for photo in PHOTOS]
    beta = [_caption(service, photo, model="beta").json() for photo in PHOTOS]
    assert {r["model"] for r in alpha} == {"alpha"} and {r["model"] for r in beta} == {"beta"}
    assert [r["caption"] for r in alpha] != [r["caption"] for r in beta]
    assert sum(a["caption"] != b["caption"] for a, b in zip(alpha, beta)) >= len(PHOTOS) // 2
    # no model named: the default; Serve's multiplexing header picks one too
    assert _caption(service, PHOTOS[0]).json() == alpha[0]
    by_header = requests.post(
        f"{service}/caption", data=PHOTOS[0], headers={"serve_multiplexed_model_id": "beta"}, timeout=60
    ).json()
    assert by_header == beta[0]
    info = _info(service, "beta")
    assert (info["model"], info["encoder"]["grid"]) == ("beta", 2)


def test_an_unknown_model_gets_404_listing_the_models(service: str) -> None:
    for response in (
        _caption(service, PHOTOS[0], model="gamma"),
        requests.get(f"{service}/model", params={"model": "gamma"}, timeout=30),
    ):
        assert response.status_code == 404
        detail = response.json()["detail"]
        assert "'gamma'" in detail and "alpha, beta" in detail


def test_the_bulk_job_captions_with_the_model_it_names(service: str, tmp_path: Path) -> None:
    source = tmp_path / "photos"
    source.mkdir()
    for i, photo in enumerate(PHOTOS[:4]):
        (source / f"{i}.jpg").write_bytes(photo)
    cfg = BulkConfig(source=str(source), out=str(tmp_path / "out"), model="beta", clients=1, in_flight=4)
    assert caption_bucket(cfg).model == "beta"
    rows = {Path(r["key"]).name: r for r in read_results(cfg.out).to_pylist()}
    assert len(rows) == 4 and {r["model"] for r in rows.values()} == {"beta"}
    for i, photo in enumerate(PHOTOS[:4]):
        assert rows[f"{i}.jpg"]["caption"] == _caption(service, photo, model="beta").json()["caption"]
    with pytest.raises(ValueError, match="no model 'gamma': it serves alpha, beta"):
        caption_bucket(BulkConfig(source=str(source), out=str(tmp_path / "o2"), model="gamma"))


def test_swapping_one_models_checkpoint_under_load_drops_nothing(
    service: str, checkpoints: dict[str, str], port: int
) -> None:
    old = _caption(service, PHOTOS[1], model="beta").json()["caption"]
    statuses: list[int] = []
    answered: list[tuple[str, str]] = []  # (model, caption) of PHOTOS[1]

    def request(model: str) -> None:
        response = _caption(service, PHOTOS[1], model=model)
        statuses.append(response.status_code)
        if response.ok:
            answered.append((model, response.json()["caption"]))

    swap_under_load(
        [functools.partial(request, m) for m in ("alpha", "beta", "beta")],
        lambda: _deploy({"alpha": checkpoints["alpha"], "beta": checkpoints["beta2"]}, port),
        lambda: _info(service, "beta")["checkpoint"] == checkpoints["beta2"],
        "swapped beta's checkpoint",
    )
    assert statuses and set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"
    new = _caption(service, PHOTOS[1], model="beta").json()
    assert new["model"] == "beta" and new["caption"] != old
    assert ("beta", new["caption"]) in answered  # served under load once swapped
    assert {caption for model, caption in answered if model == "alpha"} == {
        _caption(service, PHOTOS[1], model="alpha").json()["caption"]
    }  # the other model untouched


def test_deploying_models_on_different_trunks_fails_saying_why(
    service: str, checkpoints: dict[str, str], port: int
) -> None:
    with pytest.raises(ValueError, match="failed to deploy: Decoder: the models were trained on different encoders"):
        _deploy({"alpha": checkpoints["alpha"], "other": checkpoints["other"]}, port)  # a user error: one line
