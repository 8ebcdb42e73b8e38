"""HTTP plumbing for the Serve ingress (`raycap.serve.Captioner`), with no Serve logic in it:
bearer-token authentication, request bodies read under a size limit, multipart/form-data uploads,
and one shape for every client error: `{"detail": "<what was wrong and how to fix it>"}`, request
validation errors and unknown query parameters (`QueryParams`) included.

The token comes from RAYCAP_API_TOKEN_FILE naming a file that holds it (e.g. `runtime_env:
{env_vars: {RAYCAP_API_TOKEN_FILE: /etc/raycap/token}}` in serve_config.yaml), or from
RAYCAP_API_TOKEN in the environment Ray was started in; neither set: authentication off. Not
RAYCAP_API_TOKEN in a runtime_env: Ray logs runtime_env env vars verbatim (runtime_env_agent.log)
and `serve config` shows them. With a token, the API docs need the header too: fetch the schema
(`curl -H "Authorization: Bearer $TOKEN" http://HOST:8000/openapi.json`) and open it in any OpenAPI
viewer. Open without it: /healthz, and the page's shell (/ and /static/*: files that are the same
for everyone; the page asks for the token and sends it with every API call). Serve's own proxy paths
(/-/healthz, /-/routes) are outside the application and stay open.

An oversized body is refused from its declared Content-Length before it is sent, or as soon as a
chunked one passes the limit; Serve's HTTP proxy reads request bodies ahead without a limit of its
own, so a fast chunked sender may still push a few tens of MB into it before the 413 (put a proxy
with a body limit, e.g. nginx `client_max_body_size`, in front if that matters).
"""

import difflib
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel, model_validator
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

TOKEN_ENV = "RAYCAP_API_TOKEN"
TOKEN_FILE_ENV = "RAYCAP_API_TOKEN_FILE"
MULTIPART_OVERHEAD = 64 * 1024  # bytes of multipart headers and boundaries allowed beyond the images
UNAUTHORIZED = "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the server's token"
PAGE_DIR = Path(__file__).parent / "static"  # the page at /: index.html, app.js, app.css (package data)
# The page loads nothing but its own files and talks to nothing but this server: a browser refuses
# anything else (a CDN script, an upload elsewhere). blob: for the preview of the picked image.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


class TooManyFiles(ValueError):
    """A multipart/form-data body with more files than the route accepts; the message says the limit."""


# --- authentication ----------------------------------------------------------------------------


def api_token() -> str | None:
    """The bearer token this process requires: the first line of the file RAYCAP_API_TOKEN_FILE
    names, else RAYCAP_API_TOKEN; None when neither is set (authentication off)."""
    path = os.environ.get(TOKEN_FILE_ENV)
    if not path:
        return os.environ.get(TOKEN_ENV) or None
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"{TOKEN_FILE_ENV}={path}: cannot read the API token file ({exc})") from None
    if not lines or not lines[0].strip():
        raise ValueError(f"{TOKEN_FILE_ENV}={path}: the file is empty; put the token on its first line")
    return lines[0].strip()


def _route_path(scope: Scope) -> str:
    """The path the application routes on: Serve passes a route_prefix other than / as root_path."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root + "/") else path


class BearerTokenAuth:
    """ASGI middleware: when the replica has a token (`api_token`), every request to a path but
    `public` ones and those under `public_prefix` needs `Authorization: Bearer <token>`, else 401. It
    runs before routing, so no route, method, doc page or unknown path answers without the token, and
    a route added later is covered too."""

    def __init__(
        self,
        app: ASGIApp,
        public: frozenset[str] = frozenset({"/healthz", "/"}),
        public_prefix: str = "/static/",  # a mount of static files only: nothing else routes under it
    ) -> None:
        self.app, self.public, self.public_prefix = app, public, public_prefix
        token = api_token()  # built in the replica, on its first request
        self.token = token.encode() if token else None

    def _authorized(self, scope: Scope) -> bool:
        scheme, credentials = get_authorization_scheme_param(Headers(scope=scope).get("authorization"))
        return scheme.lower() == "bearer" and secrets.compare_digest(credentials.encode(), self.token or b"")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.token is None
            or scope["type"] not in ("http", "websocket")
            or _route_path(scope) in self.public
            or _route_path(scope).startswith(self.public_prefix)
            or self._authorized(scope)
        ):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await WebSocketClose(code=1008)(scope, receive, send)  # 1008: policy violation
        else:
            response = JSONResponse({"detail": UNAUTHORIZED}, 401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)


bearer = HTTPBearer(auto_error=False, description=f"the server's {TOKEN_FILE_ENV} or {TOKEN_ENV}")
SECURED = [Depends(bearer)]  # declares the scheme in the OpenAPI schema; BearerTokenAuth enforces it


# --- client errors -----------------------------------------------------------------------------


class Problem(BaseModel):
    """The body of every 4xx answer."""

    detail: str  # what was wrong, and how to fix it


CLIENT_ERRORS: dict[int | str, dict[str, Any]] = {  # `responses` of each API route, for the OpenAPI schema
    "4XX": {"model": Problem, "description": "A client mistake; `detail` says which, and how to fix it"}
}


class QueryParams(BaseModel):
    """A route's query parameters, as one FastAPI query parameter model (`Annotated[Model, Query()]`).
    A parameter the route does not take, such as a typo (`?beamsize=5`), gets 422 naming it and
    the known ones, rather than being ignored."""

    @model_validator(mode="before")
    @classmethod
    def _known_only(cls, given: Any) -> Any:
        known = list(cls.model_fields)
        unknown = [name for name in given if name not in known] if isinstance(given, Mapping) else []
        if unknown:
            named = []
            for name in unknown:
                close = difflib.get_close_matches(name, known, n=1)
                named.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            plural = "s" if len(named) > 1 else ""
            raise ValueError(f"unknown query parameter{plural} {', '.join(named)}; this route takes {', '.join(known)}")
        return given


def _sentence(error: Mapping[str, Any]) -> str:
    """One of FastAPI's request validation errors in words: "beam_size: input should be ..., got '0'"."""
    if error["type"] == "value_error":  # raised by our own validators: their message says it all
        return str(error["ctx"]["error"])
    name = ".".join(map(str, error["loc"][1:])) or str(error["loc"][0])  # ("query", "beam_size") -> beam_size
    got = "" if error["type"] == "missing" else f", got {error['input']!r}"
    return f"{name}: {error['msg'][:1].lower()}{error['msg'][1:]}{got}"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": "; ".join(_sentence(error) for error in exc.errors())}, 422)


def plain_errors(app: FastAPI) -> None:
    """Answer request validation errors as every other client error, `{"detail": "<words>"}`
    (FastAPI's own shape is a list of objects), so clients and the page read one shape."""
    app.add_exception_handler(RequestValidationError, _validation_error)


# --- the page ----------------------------------------------------------------------------------


def add_page(app: FastAPI) -> None:
    """Serve the page at / and its files under /static/ (open without the token, see
    BearerTokenAuth): plain HTML/JS/CSS that captions through the app's own /caption route."""
    app.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})


# --- request bodies ----------------------------------------------------------------------------

_IMAGE_BODY = {"type": "string", "format": "binary"}
SINGLE_IMAGE_BODY = {  # openapi_extra of a route taking one image, raw or as one multipart file
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": _IMAGE_BODY},
            "application/octet-stream": {"schema": _IMAGE_BODY},
            "multipart/form-data": {"schema": {"type": "object", "properties": {"image": _IMAGE_BODY}}},
        },
    }
}
MULTI_IMAGE_BODY = {  # openapi_extra of a route taking several images as multipart files
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"images": {"type": "array", "items": _IMAGE_BODY}}}
            }
        },
    }
}


async def _body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, refused with 413 from its declared Content-Length, or as soon
    as more than `limit` bytes have come: the app never holds an oversized upload whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, at most `limit` bytes (else 413)."""
    return b"".join([chunk async for chunk in _body_chunks(request, limit)])


async def multipart_files(request: Request, limit: int, max_files: int) -> list[bytes]:
    """The content of each file in a multipart/form-data body of at most `limit` bytes (else 413),
    in order; other fields ignored. Parsed as it streams in, files spooled to disk past 1 MiB.
    Raises TooManyFiles at the file after `max_files`: every part costs the parser far more than
    its bytes (a body of empty parts takes ~1 s of CPU and ~20 MiB of memory per MiB)."""
    stream = _body_chunks(request, limit)
    try:
        form = await MultiPartParser(request.headers, stream, max_files=max_files, max_fields=1000).parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):  # Starlette's words for a file beyond max_files
            raise TooManyFiles(
                f"more than {max_files} image files, over the limit of {max_files} per request"
            ) from None
        raise HTTPException(400, f"malformed multipart/form-data body: {exc.message}") from None
    try:
        return [await value.read() for _, value in form.multi_items() if isinstance(value, UploadFile)]
    finally:
        await form.close()


def is_multipart(headers: Headers) -> bool:
    return headers.get("content-type", "").lower().startswith("multipart/form-data")
