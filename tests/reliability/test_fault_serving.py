"""Serving under faults, load and hostile clients: the repo's serve_config.yaml deployed on the
session's Ray with a bearer token, the Encoder pinned to 1 replica and the Decoder to 2, called over
real HTTP on 127.0.0.1 (raw sockets where a client library would behave too well).

A Decoder replica killed under load must cost no request; each hostile upload gets a defined answer
and leaves the service healthy; requests fuzzed from the OpenAPI schema get no 5xx; no path but
/healthz and the page's files answers without the token, which never reaches a log; metrics and
JSON logs come out.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import secrets
import select
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import ray
import requests
import schemathesis
from helpers import free_port, image, make_checkpoint, png_header
from hypothesis import HealthCheck, settings
from PIL import Image
from ray import serve

from raycap.data.images import decode_image
from raycap.serve import api
from raycap.serve_deploy import deploy, load_config, replica_counts
from raycap.serve_http import TOKEN_FILE_ENV
from raycap.serve_schema import APP_NAME

CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"
TOKEN = f"fault-{secrets.token_hex(16)}"  # fresh per run: any copy found in the logs is this run's
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BYTES, MAX_IMAGES, MAX_LEN = 1 << 20, 4, 12
HUGE = 50 * 2**20  # the hostile upload: 50 MiB
CLIENTS = 6  # concurrent clients while a Decoder replica is killed
DECODER_REPLICAS = 2
# Each request waits this long for its Decoder batch to fill: the Decoder replicas always hold
# requests in flight under load, so the kill hits some (beam search alone takes ~20 ms here).
DECODER_BATCH_WAIT_S = 0.2


@pytest.fixture(scope="module")
def service(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The application deployed once for this module, the token in a file; yields its base URL."""
    root = tmp_path_factory.mktemp("fault")
    checkpoint = make_checkpoint(root, "fault", grid=4, seed=0)
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    pinned = {"autoscaling_config": None}
    decoding = {"max_decode_len": MAX_LEN, "batch_wait_timeout_s": DECODER_BATCH_WAIT_S}
    overrides = {
        "args": {"max_image_bytes": MAX_BYTES, "max_images_per_request": MAX_IMAGES},
        "runtime_env": {"env_vars": {TOKEN_FILE_ENV: str(token_file)}},
        "deployments": {
            "Encoder": {**pinned, "num_replicas": 1},
            "Decoder": {**pinned, "num_replicas": DECODER_REPLICAS, "user_config": decoding},
        },
    }
    url = deploy(load_config(CONFIG, checkpoint=str(checkpoint), port=free_port(), overrides=overrides))
    try:
        yield url
    finally:
        serve.shutdown()


def _caption(url: str, data: bytes, **kwargs) -> requests.Response:
    return requests.post(f"{url}/caption", data=data, headers=AUTH, timeout=60, **kwargs)


def _assert_healthy(url: str) -> None:
    """/healthz answers and a normal image still gets its caption."""
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    response = _caption(url, image(1))
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["caption"], str)


def _connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)


def _send_head(conn: http.client.HTTPConnection, path: str, headers: dict[str, str], method: str = "POST") -> None:
    """A request line and these headers (and Host), no body yet."""
    conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders()


def _session_logs() -> Path:
    """This Ray session's log folder (not /tmp/ray/session_latest: other sessions may share the machine)."""
    return Path(ray._private.worker._global_node.get_logs_dir_path())


def _replica_logs(deployment: str) -> list[Path]:
    return sorted((_session_logs() / "serve").glob(f"replica_{APP_NAME}_{deployment}_*.log"))


def _decoder_replicas() -> list[str]:
    """Names of the running Decoder replica actors (Serve names them so, in namespace "serve")."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#Decoder#"
    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in actors if a["namespace"] == "serve" and a["name"].startswith(prefix))


# --- hostile clients ------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_slow_client_trickling_its_body_gets_its_caption(service: str) -> None:
    data = image(2)
    conn = _connect(service)
    _send_head(conn, "/caption", {**AUTH, "Content-Type": "image/jpeg", "Content-Length": str(len(data))})
    pieces = 12
    step = -(-len(data) // pieces)
    for i in range(0, len(data), step):  # ~5 s in all
        conn.send(data[i : i + step])
        time.sleep(0.4)
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 200, body
    assert body["caption"] == _caption(service, data).json()["caption"]
    _assert_healthy(service)


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_clients_hanging_up_mid_upload_and_mid_response_leave_the_service_healthy(service: str) -> None:
    data = image(3)
    for _ in range(3):  # mid-upload: half the declared body, then gone
        conn = _connect(service)
        _send_head(conn, "/caption", {**AUTH, "Content-Type": "image/jpeg", "Content-Length": str(len(data))})
        conn.send(data[: len(data) // 2])
        conn.close()
    batch = [("images", (f"{i}.jpg", image(30 + i), "image/jpeg")) for i in range(MAX_IMAGES)]
    prepared = requests.Request("POST", f"{service}/caption/batch", headers=AUTH, files=batch).prepare()
    for _ in range(3):  # mid-response: the whole request, then gone before the captions come back
        conn = _connect(service)
        _send_head(conn, "/caption/batch", dict(prepared.headers))
        conn.send(prepared.body)
        conn.close()
    time.sleep(1.0)  # let the proxy notice the hang-ups and cancel
    _assert_healthy(service)
    response = requests.post(f"{service}/caption/batch", files=batch, headers=AUTH, timeout=60)
    assert response.status_code == 200 and len(response.json()["results"]) == MAX_IMAGES


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/caption", "image/jpeg"), ("/caption", "multipart/form-data; boundary=x"),
     ("/caption/batch", "multipart/form-data; boundary=x")],
)  # fmt: skip
def test_huge_declared_upload_is_refused_before_its_body_is_sent(service: str, path: str, content_type: str) -> None:
    conn = _connect(service)
    _send_head(conn, path, {**AUTH, "Content-Type": content_type, "Content-Length": str(HUGE)})
    conn.send(b"\xff" * 65536)  # 64 KiB of the 50 MiB declared: the answer must not wait for the rest
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 413 and f"{HUGE} bytes exceeds the limit" in body["detail"], body
    _assert_healthy(service)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_huge_chunked_upload_is_refused_once_past_the_limit(service: str) -> None:
    """Sent as fast as loopback takes it. Serve's proxy reads bodies ahead of the app, so how much
    gets sent before the 413 is up to the proxy (printed, not asserted); the app reads no further."""
    parts = urlsplit(service)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    head = (f"POST /caption HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode())
    chunk = b"\xff" * (256 * 1024)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    while sent < HUGE and not select.select([sock], [], [], 0)[0]:  # until the server answers
        try:
            sock.sendall(framed)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = json.loads(response.read())
    sock.close()
    assert response.status == 413 and "exceeds the limit" in body["detail"], body
    print(f"\n[fault] chunked upload: 413 after {sent / 2**20:.1f} of {HUGE / 2**20:.0f} MiB sent")
    _assert_healthy(service)


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_batch_of_many_tiny_parts_is_refused_at_the_first_file_over_the_limit(service: str) -> None:
    part = b"--b\r\nContent-Disposition: form-data; name=images; filename=x.jpg\r\n\r\n\r\n"
    upload = part * 50_000 + b"--b--\r\n"  # 3.4 MB of empty files: within the byte limit, costly to parse
    conn = _connect(service)
    conn.timeout = 30
    content_type = "multipart/form-data; boundary=b"
    _send_head(conn, "/caption/batch", {**AUTH, "Content-Type": content_type, "Content-Length": str(len(upload))})
    conn.send(part * (MAX_IMAGES + 2))  # the answer must come without the other 49,994 parts
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 413 and f"over the limit of {MAX_IMAGES} per request" in body["detail"], body
    _assert_healthy(service)


def _bomb_png(width: int, height: int) -> bytes:
    """A real grey PNG of width x height zeros: a few hundred KB that decode to width*height bytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encoded(pil: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _hostile_images() -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, status, words in the caption or the reason)."""
    photo = Image.open(io.BytesIO(image(7, size=(96, 72))))
    frames = [Image.open(io.BytesIO(image(8 + i, size=(96, 72)))) for i in range(3)]
    gif = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    grey16 = Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257)  # mode I;16
    jpeg = image(9)
    return {
        "bomb header 100000x100000": (png_header(100_000, 100_000), 400, "too large"),
        "bomb 9000x8000 zeros": (_bomb_png(9_000, 8_000), 400, "exceeds 64000000 pixels"),  # the app's max_pixels
        "truncated jpeg": (jpeg[: len(jpeg) * 2 // 3], 400, "corrupt"),
        "animated gif": (gif, 200, ""),
        "webp": (_encoded(photo, "WEBP", quality=80), 200, ""),
        "16-bit png": (_encoded(grey16, "PNG"), 200, ""),
    }


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", list(_hostile_images()))
def test_hostile_image_gets_a_defined_answer_and_the_service_stays_healthy(service: str, case: str) -> None:
    data, status, reason = _hostile_images()[case]
    assert len(data) < MAX_BYTES  # refused for what it is, not for its size
    response = _caption(service, data)
    assert response.status_code == status, response.text
    if status == 200:  # the caption of what the shared decode path makes of it, as a plain PNG
        as_png = _encoded(decode_image(data).image, "PNG")
        assert response.json()["caption"] == _caption(service, as_png).json()["caption"]
    else:
        assert reason in response.json()["detail"]
    _assert_healthy(service)


# --- authentication ------------------------------------------------------------------------------


def _bad_credentials() -> dict[str, tuple[dict[str, str], str]]:
    """name -> (headers, query string) that must not pass for the token."""
    basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()
    return {
        "none": ({}, ""),
        "Bearer, no token": ({"Authorization": "Bearer"}, ""),
        "Bearer, empty token": ({"Authorization": "Bearer "}, ""),
        "wrong token": ({"Authorization": "Bearer wrong"}, ""),
        "token prefix": ({"Authorization": f"Bearer {TOKEN[:-1]}"}, ""),
        "token plus a character": ({"Authorization": f"Bearer {TOKEN}x"}, ""),
        "no scheme": ({"Authorization": TOKEN}, ""),
        "Token scheme": ({"Authorization": f"Token {TOKEN}"}, ""),
        "Basic user:token": ({"Authorization": f"Basic {basic}"}, ""),
        "Basic token": ({"Authorization": f"Basic {TOKEN}"}, ""),
        "other headers": ({"X-API-Key": TOKEN, "Cookie": f"token={TOKEN}"}, ""),
        "query string": ({}, f"?token={TOKEN}&access_token={TOKEN}&api_key={TOKEN}"),
    }


def _answer(conn: http.client.HTTPConnection, method: str, target: str, headers: dict[str, str]) -> tuple[int, str]:
    """(status, WWW-Authenticate) of a request sent as given on a kept-alive connection."""
    _send_head(conn, target, {**headers, "Content-Length": "0"}, method)
    response = conn.getresponse()
    response.read()
    return response.status, response.getheader("WWW-Authenticate", "")


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_no_path_method_or_credential_trick_gets_past_the_token_but_healthz(service: str) -> None:
    schema_paths = set(requests.get(f"{service}/openapi.json", headers=AUTH, timeout=30).json()["paths"])
    assert {"/caption", "/caption/batch", "/model", "/healthz"} <= schema_paths
    odd = ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "//caption", "/caption/", "/CAPTION",
           "/caption/../model", "/%63aption", "/model%2F", "/healthz/../model", "/healthz/", "/nope"]  # fmt: skip
    public = ["/healthz", "/", "/static/app.js", "/static/docs/swagger-ui-bundle.js"]  # the page's and docs' files
    # Open as files under /static/, but they must reach no route: Starlette routes on the raw path, so
    # these stay in the static mount, which refuses to leave its folder.
    escapes = ["/static/../model", "/static/%2e%2e/model", "/static/docs/../../caption", "/static/..%2fmodel"]
    methods = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]
    passed = []
    conn = _connect(service)
    for path in sorted(schema_paths) + odd + public + escapes:
        for method in methods:
            for name, (headers, query) in _bad_credentials().items():
                status, challenge = _answer(conn, method, path + query, headers)
                if path in public:
                    assert status != 401, (method, path, name)
                elif path in escapes:
                    if status not in (404, 405):
                        passed.append(f"{method} {path}{query} with {name}: {status}")
                elif (status, challenge) != (401, "Bearer"):
                    passed.append(f"{method} {path}{query} with {name}: {status}")
    conn.close()
    assert not passed, "\n".join(passed)
    assert requests.get(f"{service}/healthz", timeout=30).status_code == 200


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_token_opens_every_route_and_the_docs(service: str, scheme: str) -> None:
    headers = {"Authorization": f"{scheme} {TOKEN}"}  # RFC 9110: the scheme is case-insensitive
    for path in ("/model", "/docs", "/redoc", "/openapi.json"):
        response = requests.get(f"{service}{path}", headers=headers, timeout=30)
        assert response.status_code == 200, (path, response.text)
    assert response.json() == json.loads(json.dumps(api.openapi()))  # what the fuzzing below reads
    assert requests.post(f"{service}/caption", data=image(4), headers=headers, timeout=60).status_code == 200


# --- fuzzing -------------------------------------------------------------------------------------


# The schema the service serves (the test above checks they are equal), read here at import so
# pytest can make one test per operation; positive and negative (schema-violating) requests.
api_schema = schemathesis.openapi.from_dict(api.openapi())
api_schema.config.generation.update(modes=list(schemathesis.GenerationMode))


@pytest.mark.integration
@pytest.mark.timeout(120)
@api_schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzzed_requests_get_no_server_error(case: schemathesis.Case, service: str) -> None:
    response = case.call(base_url=service, headers=AUTH, timeout=60)
    assert response.status_code < 500, f"{case.as_curl_command()}\n-> {response.status_code} {response.text[:500]}"


# --- replica failure -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_killing_a_decoder_replica_under_load_loses_no_request(service: str) -> None:
    images = [image(40 + i) for i in range(8)]
    outcomes: list[tuple[float, float, int | str]] = []  # (sent, answered) seconds since t0, status or error
    stop = threading.Event()
    t0 = time.monotonic()

    def client(k: int) -> None:
        with requests.Session() as session:
            for i in range(k, 100_000, CLIENTS):
                if stop.is_set():
                    return
                sent = time.monotonic() - t0
                try:
                    r = session.post(f"{service}/caption", data=images[i % len(images)], headers=AUTH, timeout=60)
                    outcome: int | str = r.status_code
                except requests.RequestException as exc:
                    outcome = type(exc).__name__
                outcomes.append((sent, time.monotonic() - t0, outcome))

    before = _decoder_replicas()
    assert len(before) == DECODER_REPLICAS, before
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(4.0)  # steady load first
        victim = ray.get_actor(before[0], namespace="serve")
        # Kill it while it holds requests: get_num_ongoing_requests is the replica actor's method
        # that Serve's own router polls (it runs beside user code, on its own thread).
        while (ongoing := ray.get(victim.get_num_ongoing_requests.remote(), timeout=30)) == 0:
            assert time.monotonic() - t0 < 60, "the Decoder replica never held a request"
            time.sleep(0.01)
        ray.kill(victim, no_restart=True)
        killed = time.monotonic() - t0
        recovered = None
        while time.monotonic() - t0 < killed + 90:  # until a new replica runs beside the survivor
            replicas = _decoder_replicas()
            if set(replicas) - set(before) and replica_counts().get("Decoder") == DECODER_REPLICAS:
                recovered = time.monotonic() - t0
                break
            time.sleep(0.25)
        time.sleep(3.0)  # load on the replacement too
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    failed = [o for o in outcomes if o[2] != 200]
    around = [answered - sent for sent, answered, _ in outcomes if sent <= killed <= answered]
    time.sleep(1.0)  # let the Captioner's log handler flush
    retries = sum(path.read_text().count("was lost mid-request") for path in _replica_logs("Captioner"))
    print(
        f"\n[fault] {len(outcomes)} requests from {CLIENTS} clients, {len(failed)} failed, {retries} retried; "
        f"Decoder replica killed at {killed:.1f} s holding {ongoing} requests, replaced after "
        f"{(recovered or float('nan')) - killed:.1f} s; {len(around)} requests spanned the kill, "
        f"slowest {max(around, default=0):.2f} s"
    )
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:10]}"
    assert retries >= 1, "no request was caught on the killed replica: the fault was not exercised"
    assert recovered is not None, "Serve did not replace the killed Decoder replica within 90 s"
    assert len([o for o in outcomes if o[0] > recovered]) > 0, "no request was sent after the recovery"
    _assert_healthy(service)


# --- what an operator sees -----------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_token_never_reaches_the_logs(service: str) -> None:
    data = image(5)
    assert _caption(service, data).status_code == 200
    wrong = {"Authorization": f"Bearer {TOKEN}x"}  # a wrong token that contains the right one
    assert requests.post(f"{service}/caption", data=data, headers=wrong, timeout=30).status_code == 401
    assert requests.get(f"{service}/model?token={TOKEN}", timeout=30).status_code == 401
    assert _caption(service, b"not an image").status_code == 400  # a logged client error
    time.sleep(2.0)  # let the replicas' log handlers flush
    logs = [p for p in _session_logs().rglob("*") if p.is_file()]
    assert any(p.parent.name == "serve" for p in logs), f"no Serve logs under {_session_logs()}"
    leaks = [str(p) for p in logs if TOKEN.encode() in p.read_bytes()]
    assert not leaks, f"the token appears in {leaks}"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_replica_logs_are_json_lines_with_request_ids(service: str) -> None:
    assert _caption(service, image(6)).status_code == 200
    time.sleep(1.0)
    records = []
    for path in _replica_logs("Captioner"):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert records, "no Captioner replica log"
    access = [r for r in records if r.get("route") == "/caption" and "POST /caption 200" in r["message"]]
    assert access, records[-3:]
    assert {"levelname", "asctime", "deployment", "replica", "request_id"} <= set(access[-1])


def _scrape(port: int, names: list[str], timeout_s: float = 45.0) -> dict[str, float]:
    """Samples of Ray's Prometheus endpoint whose line starts with one of `names`, summed per name,
    once all are there (Ray exports every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        found: dict[str, float] = {}
        for line in text.splitlines():
            for name in names:
                if line.startswith(name):
                    found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        if len(found) == len(names) or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_request_latency_and_batch_size_metrics_are_exported(service: str) -> None:
    files = [("images", (f"{i}.jpg", image(50 + i), "image/jpeg")) for i in range(MAX_IMAGES)]
    assert requests.post(f"{service}/caption/batch", files=files, headers=AUTH, timeout=60).status_code == 200
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    names = [
        'ray_serve_num_http_requests_total{',
        'ray_serve_http_request_latency_ms_count{',
        'ray_serve_actual_batch_size_count{',
        'ray_raycap_model_batch_size_count{',
        'ray_raycap_model_batch_size_sum{',
        'ray_raycap_captions_total{',
    ]
    found = _scrape(node["MetricsExportPort"], names)
    assert set(found) == set(names), f"missing: {set(names) - set(found)}"
    # Every image went through one encoder call and one beam search: images per call >= 1 on average.
    assert found['ray_raycap_model_batch_size_sum{'] >= found['ray_raycap_model_batch_size_count{'] > 0
