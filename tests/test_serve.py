"""Serving: the repo's serve_config.yaml deployed on the session's Ray and called over real HTTP on
127.0.0.1. Captions must equal the model called directly (encoder -> batched beam search -> vocab)
on the same bytes; every client mistake gets its 4xx; a checkpoint swap drops no request."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from helpers import free_port, image, make_checkpoint, png_header, swap_under_load
from ray import serve
from ray.serve.schema import ServeDeploySchema

from raycap import storage
from raycap.models.beam import Caption, beam_search
from raycap.models.checkpoint import CaptionModel, load_checkpoint
from raycap.models.encoder import Encoder
from raycap.serve import (
    AppArgs,
    CaptionDecoder,
    CaptionOptions,
    Captioner,
    DecoderSettings,
    EncoderSettings,
    ImageEncoder,
)
from raycap.serve_deploy import _with_endpoint, check_port_free, deploy, load_config
from raycap.serve_http import TOKEN_ENV
from raycap.serve_schema import APP_NAME

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "serve_config.yaml"
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_LEN = 12  # words per caption: keeps random-weight captions short
MAX_BYTES, MAX_IMAGES = 40_000, 4


@dataclass(frozen=True)
class Model:
    """A checkpoint and its parts, loaded here to caption directly."""

    checkpoint: str
    name: str
    encoder: Encoder
    caption_model: CaptionModel

    def caption(self, image: bytes, beam_size: int = 3, num_captions: int = 1) -> list[tuple[str, float, torch.Tensor]]:
        """(caption, score, attention (words, P)) best first, as the service must answer: one map
        per word that `Vocab.decode` shows (random weights may emit <pad> or <start>, which it skips)."""
        array, _ = self.encoder.preprocess(image)
        features = self.encoder.encode(array[None].copy())  # (1, P, C)
        vocab = self.caption_model.vocab
        captions = beam_search(
            self.caption_model.decoder, features, vocab.start_id, vocab.end_id,
            beam_size=beam_size, max_len=MAX_LEN, num_captions=num_captions, banned=(vocab.unk_id,),
        )[0]  # fmt: skip
        shown = [[i for i, t in enumerate(c.tokens) if t not in (vocab.start_id, vocab.pad_id)] for c in captions]
        return [(vocab.decode_text(c.tokens), c.score, c.alphas[rows]) for c, rows in zip(captions, shown)]


def _model(checkpoint: str, local: Path) -> Model:
    caption_model = load_checkpoint(local)
    return Model(checkpoint, Path(checkpoint).name, Encoder(caption_model.encoder_cfg), caption_model)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, s3_server) -> dict[str, Model]:
    """Two checkpoints: `first` (local, grid 4) is served; `second` (on S3, grid 2: another encoder
    config) is swapped in."""
    root = tmp_path_factory.mktemp("checkpoints")
    first = make_checkpoint(root, "first", grid=4, seed=0)
    second = make_checkpoint(root, "second", grid=2, seed=1)
    bucket = s3_server.make_bucket()
    uri = f"s3://{bucket}/models/second"
    for file in second.iterdir():
        storage.write_bytes(f"{uri}/{file.name}", file.read_bytes())
    return {"first": _model(str(first), first), "second": _model(uri, second)}


def _config(checkpoint: str, port: int) -> ServeDeploySchema:
    """The repo's serve_config.yaml with only the checkpoint, port, limits and token changed."""
    overrides = {
        "args": {"max_image_bytes": MAX_BYTES, "max_images_per_request": MAX_IMAGES},
        "runtime_env": {"env_vars": {TOKEN_ENV: TOKEN}},
        "deployments": {"Decoder": {"user_config": {"max_decode_len": MAX_LEN}}},
    }
    return load_config(CONFIG, checkpoint=checkpoint, port=port, overrides=overrides)


@pytest.fixture(scope="module")
def service(ray_session: None, models: dict[str, Model]) -> Iterator[str]:
    """The application deployed once for this module; yields its base URL."""
    port = free_port()
    url = deploy(_config(models["first"].checkpoint, port))
    try:
        yield url
    finally:
        serve.shutdown()


def _post(url: str, path: str, data: bytes = b"", headers: dict | None = None, **kwargs) -> requests.Response:
    return requests.post(f"{url}{path}", data=data, headers={**AUTH, **(headers or {})}, timeout=60, **kwargs)


def _files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.jpg", photo, "image/jpeg")) for i, photo in enumerate(images)]


# --- no Ray --------------------------------------------------------------------------------------


def test_serve_config_validates_against_serve_schema_and_our_settings() -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "raycap.serve:app_builder" and app.name == APP_NAME
    AppArgs.model_validate(app.args)
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Captioner", "Encoder", "Decoder"}
    EncoderSettings.model_validate(deployments["Encoder"].user_config)
    DecoderSettings.model_validate(deployments["Decoder"].user_config)
    for name in ("Encoder", "Decoder"):
        scaling = deployments[name].autoscaling_config
        assert 1 <= scaling["min_replicas"] < scaling["max_replicas"] and scaling["target_ongoing_requests"] > 0
        assert deployments[name].user_config["checkpoint"] == deployments["Encoder"].user_config["checkpoint"]
    assert "RAYCAP_API_TOKEN" not in yaml.safe_dump(raw)  # authentication is off by default


def test_load_config_overrides_checkpoint_port_and_merges_deployments() -> None:
    config = load_config(CONFIG, checkpoint="s3://b/ckpt", port=9999, overrides={
        "args": {"max_beam_size": 4}, "deployments": {"Decoder": {"num_replicas": 1, "autoscaling_config": None}},
    })  # fmt: skip
    (app,) = config.applications
    deployments = {d.name: d for d in app.deployments}
    assert config.http_options.port == 9999
    assert app.args["max_beam_size"] == 4 and app.args["max_images_per_request"] == 16  # merged, not replaced
    assert [deployments[name].user_config["checkpoint"] for name in ("Encoder", "Decoder")] == ["s3://b/ckpt"] * 2
    assert deployments["Decoder"].num_replicas == 1 and deployments["Decoder"].user_config["max_batch_size"] == 16


def test_deploy_hands_the_replicas_this_process_s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.ENDPOINT_ENV, "http://127.0.0.1:9")
    (app,) = _with_endpoint(load_config(CONFIG, checkpoint="s3://b/ckpt")).applications
    assert app.runtime_env["env_vars"] == {storage.ENDPOINT_ENV: "http://127.0.0.1:9"}
    overrides = {"runtime_env": {"env_vars": {storage.ENDPOINT_ENV: "http://file:1", TOKEN_ENV: "t"}}}
    (app,) = _with_endpoint(load_config(CONFIG, checkpoint="s3://b/ckpt", overrides=overrides)).applications
    assert app.runtime_env["env_vars"] == {storage.ENDPOINT_ENV: "http://file:1", TOKEN_ENV: "t"}  # the file's wins


@pytest.mark.parametrize("port", [0, 65536, 99999])
def test_a_port_out_of_range_is_refused_when_the_config_loads(port: int) -> None:
    with pytest.raises(ValueError, match=f"HTTP port {port} is out of range: give a port from 1 to 65535"):
        load_config(CONFIG, checkpoint="/c", port=port)


def test_a_busy_port_is_refused_before_ray_starts_naming_the_way_out() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"port {port} on 127.0.0.1 is in use.*pass --port N"):
            check_port_free(load_config(CONFIG, checkpoint="/c", port=port))
    check_port_free(load_config(CONFIG, checkpoint="/c", port=port))  # closed: free again


def test_deployment_options_live_only_in_serve_config() -> None:
    bare = serve.deployment(Captioner.func_or_class)  # Serve's defaults
    for deployment in (ImageEncoder, CaptionDecoder, Captioner):
        assert deployment._deployment_config.user_configured_option_names == {"name"}
        assert deployment.ray_actor_options == bare.ray_actor_options
    config = yaml.safe_load(CONFIG.read_text())["applications"][0]["deployments"]
    assert {d["name"] for d in config} == {"Encoder", "Decoder", "Captioner"}
    assert all("max_ongoing_requests" in d and "ray_actor_options" in d for d in config)


def test_job_help_runs() -> None:
    job = [sys.executable, str(REPO / "jobs" / "serve.py"), "--help"]
    result = subprocess.run(job, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and "--checkpoint" in result.stdout


def _float32_log_prob(model: CaptionModel, features: torch.Tensor, tokens: list[int]) -> float:
    """log P(tokens, <end> | features (P, C)) under the float32 decoder: how the model ranks a caption."""
    vocab = model.vocab
    caption = torch.tensor([[vocab.start_id, *tokens, vocab.end_id]])  # (1, T+1)
    with torch.inference_mode():
        logits = model.decoder(features[None], caption).logits  # (1, T, V)
    return float(torch.log_softmax(logits, dim=-1)[0].gather(1, caption[0, 1:, None]).sum())


def test_encoder_cpu_bfloat16_changes_a_caption_only_for_one_float32_ranks_as_high(tmp_path: Path) -> None:
    """The Encoder's cpu_bfloat16 (its trunk under bfloat16 autocast) keeps float32's captions but
    where beams nearly tie, and scores them closely."""
    model = load_checkpoint(make_checkpoint(tmp_path, "first", grid=4, seed=0))
    encoder, vocab = Encoder(model.encoder_cfg), model.vocab
    images = np.stack([encoder.preprocess(image(seed))[0] for seed in range(8)])  # (8, S, S, 3)

    def best(features: torch.Tensor) -> list[Caption]:
        found = beam_search(
            model.decoder, features, vocab.start_id, vocab.end_id, max_len=MAX_LEN, banned=(vocab.unk_id,)
        )
        return [captions[0] for captions in found]

    features = encoder.encode(images)  # (8, P, C)
    want, got = best(features), best(encoder.encode(images, cpu_bfloat16=True))
    assert len({tuple(c.tokens) for c in want}) > 1  # captions differ per image: the comparison means something
    for image_features, w, g in zip(features, want, got):
        assert g.score == pytest.approx(w.score, rel=0.02)
        assert _float32_log_prob(model, image_features, g.tokens) >= w.score - 0.01 * abs(w.score)


# --- over HTTP ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_caption_of_raw_body_equals_the_model_called_directly(service: str, models: dict[str, Model]) -> None:
    photo = image(1)
    response = _post(service, "/caption", photo, {"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    body = response.json()
    ((caption, score, _),) = models["first"].caption(photo)
    assert body["caption"] == caption and body["score"] == pytest.approx(score, rel=1e-4, abs=1e-4)
    assert body["model"] == "first" and "beams" not in body and "attention" not in body


@pytest.mark.integration
def test_multipart_upload_with_beams_and_attention_maps(service: str, models: dict[str, Model]) -> None:
    photo = image(2, fmt="PNG")
    params = {"beam_size": 4, "num_captions": 3, "attention": "true"}
    response = _post(service, "/caption", files={"image": ("x.png", photo, "image/png")}, params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = models["first"].caption(photo, beam_size=4, num_captions=3)
    assert [b["caption"] for b in body["beams"]] == [caption for caption, _, _ in expected]
    assert [b["score"] for b in body["beams"]] == pytest.approx([s for _, s, _ in expected], rel=1e-4, abs=1e-4)
    assert body["caption"] == expected[0][0] and body["attention"] == body["beams"][0]["attention"]
    for beam, (caption, _, alphas) in zip(body["beams"], expected):
        maps = np.array(beam["attention"])
        assert maps.shape == (len(caption.split()), 4, 4)  # (words, grid, grid)
        np.testing.assert_allclose(maps.reshape(len(maps), -1), alphas.numpy(), atol=1e-4)
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-4)


@pytest.mark.integration
def test_batch_captions_equal_the_model_in_upload_order(service: str, models: dict[str, Model]) -> None:
    images = [image(10 + i, size=(50 + 10 * i, 70)) for i in range(MAX_IMAGES)]
    response = _post(service, "/caption/batch", files=_files(images))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = [models["first"].caption(photo)[0] for photo in images]
    assert [r["caption"] for r in results] == [caption for caption, _, _ in expected]
    assert [r["score"] for r in results] == pytest.approx([s for _, s, _ in expected], rel=1e-4, abs=1e-4)


@pytest.mark.integration
def test_python_handle_gives_the_http_answer(service: str) -> None:
    photo = image(3)
    handle = serve.get_app_handle(APP_NAME)
    (result,) = handle.caption_images.remote([photo], CaptionOptions(beam_size=2)).result(timeout_s=60)
    over_http = _post(service, "/caption", photo, params={"beam_size": 2}).json()
    assert result.model_dump(exclude_none=True) == over_http


@pytest.mark.integration
def test_model_info_and_health_and_docs(service: str, models: dict[str, Model]) -> None:
    info = requests.get(f"{service}/model", headers=AUTH, timeout=30).json()
    model = models["first"].caption_model
    assert info["checkpoint"] == models["first"].checkpoint and info["model"] == "first"
    assert info["vocab_size"] == len(model.vocab)
    assert (info["encoder"]["arch"], info["encoder"]["grid"]) == ("resnet18", 4)
    assert requests.get(f"{service}/healthz", timeout=30).json() == {"status": "ok"}
    schema = requests.get(f"{service}/openapi.json", headers=AUTH, timeout=30).json()
    assert {"/caption", "/caption/batch", "/model", "/healthz"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert requests.get(f"{service}/docs", headers=AUTH, timeout=30).status_code == 200
    for path in ("/docs", "/openapi.json"):  # with a token set, no path but /healthz answers without it
        assert requests.get(f"{service}{path}", timeout=30).status_code == 401


def _bad_requests() -> dict[str, tuple[str, dict, int, str]]:
    """name -> (path, requests kwargs, status, words in the reason)."""
    jpeg = image(4)
    many = _files([image(20 + i) for i in range(MAX_IMAGES + 1)])
    return {
        "empty body": ("/caption", {"data": b""}, 400, "empty"),
        "text": ("/caption", {"data": b"these are notes, not a photo\n"}, 400, "not an image"),
        "truncated jpeg": ("/caption", {"data": jpeg[: len(jpeg) // 2]}, 400, "corrupt"),
        "decompression bomb": ("/caption", {"data": png_header(100_000, 100_000)}, 400, "too large"),
        "oversize body": ("/caption", {"data": b"\xff" * (MAX_BYTES + 1)}, 413, "limit"),
        "oversize upload": ("/caption", {"files": {"image": ("big.jpg", b"\xff" * (MAX_BYTES + 1))}}, 413, "limit"),
        "two files on /caption": ("/caption", {"files": _files([jpeg, jpeg])}, 400, "/caption/batch"),
        "bad image in batch": ("/caption/batch", {"files": _files([jpeg, b"nope"])}, 400, "image 2"),
        "too many images": ("/caption/batch", {"files": many}, 413, f"limit of {MAX_IMAGES}"),
        "batch not multipart": ("/caption/batch", {"data": jpeg}, 415, "multipart"),
        "beam_size 0": ("/caption", {"data": jpeg, "params": {"beam_size": 0}}, 422, "beam_size"),
        "beam_size over limit": ("/caption", {"data": jpeg, "params": {"beam_size": 11}}, 422, "between 1 and 10"),
        "num_captions over beam": (
            "/caption", {"data": jpeg, "params": {"beam_size": 2, "num_captions": 3}}, 422, "beam_size (2)"
        ),
        "beam_size not a number": ("/caption", {"data": jpeg, "params": {"beam_size": "x"}}, 422, "valid integer"),
        "typo'd parameter": (
            "/caption", {"data": jpeg, "params": {"beamsize": 5}}, 422,
            "'beamsize' (did you mean 'beam_size'?); this route takes model, beam_size, num_captions, attention",
        ),  # fmt: skip
        "unknown parameter on batch": ("/caption/batch", {"files": _files([jpeg]), "params": {"n": 2}}, 422, "'n'"),
    }


@pytest.mark.integration
@pytest.mark.parametrize("case", list(_bad_requests()))
def test_client_mistakes_get_4xx_with_a_reason(service: str, case: str) -> None:
    path, kwargs, status, reason = _bad_requests()[case]
    response = _post(service, path, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["detail"] and isinstance(body["detail"], str), body  # one shape for every 4xx
    assert reason in body["detail"]


@pytest.mark.integration
def test_model_info_refuses_an_unknown_parameter(service: str) -> None:
    response = requests.get(f"{service}/model", params={"modle": "first"}, headers=AUTH, timeout=30)
    assert response.status_code == 422
    expected = "unknown query parameter 'modle' (did you mean 'model'?); this route takes model"
    assert response.json() == {"detail": expected}


@pytest.mark.integration
def test_deploying_on_another_port_than_the_running_serve_is_refused(service: str, models: dict[str, Model]) -> None:
    port = int(service.rsplit(":", 1)[1])
    with pytest.raises(ValueError, match=f"Serve already runs .* HTTP on 127.0.0.1:{port}, .*use port {port}"):
        deploy(_config(models["first"].checkpoint, free_port()))
    assert requests.get(f"{service}/healthz", timeout=30).ok  # the running application is untouched


@pytest.mark.integration
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}])
def test_token_is_required_on_every_route_but_healthz(service: str, headers: dict) -> None:
    photo = image(5)
    calls = [
        requests.post(f"{service}/caption", data=photo, headers=headers, timeout=30),
        requests.post(f"{service}/caption/batch", files=_files([photo]), headers=headers, timeout=30),
        requests.get(f"{service}/model", headers=headers, timeout=30),
    ]
    assert [r.status_code for r in calls] == [401, 401, 401]
    assert all(r.headers["WWW-Authenticate"] == "Bearer" for r in calls)
    assert requests.get(f"{service}/healthz", headers=headers, timeout=30).status_code == 200


@pytest.mark.integration
def test_reconfigure_swaps_to_an_s3_checkpoint_without_dropping_requests(
    service: str, models: dict[str, Model]
) -> None:
    photo, port = image(6), int(service.rsplit(":", 1)[1])
    statuses: list[int] = []
    seen: set[str] = set()

    def request() -> None:
        response = _post(service, "/caption", photo)
        statuses.append(response.status_code)
        if response.ok:
            seen.add(response.json()["model"])

    swap_under_load(
        [request] * 3,
        lambda: deploy(_config(models["second"].checkpoint, port)),
        lambda: requests.get(f"{service}/model", headers=AUTH, timeout=30).json()["model"] == "second",
        "loaded the new checkpoint",
    )
    assert statuses and set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"
    assert "second" in seen
    body = _post(service, "/caption", photo, params={"attention": "true"}).json()
    ((caption, score, _),) = models["second"].caption(photo)
    assert (body["model"], body["caption"]) == ("second", caption)
    assert body["score"] == pytest.approx(score, rel=1e-4, abs=1e-4)
    assert np.array(body["attention"]).shape == (len(caption.split()), 2, 2)
