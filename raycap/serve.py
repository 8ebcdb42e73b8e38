"""Ray Serve stage: an `Encoder` and a `Decoder` deployment behind a FastAPI ingress.

    serve run serve_config.yaml        # local: starts Ray, serves http://127.0.0.1:8000 (docs at /docs)
    serve deploy serve_config.yaml     # a running cluster (through its dashboard)

Encoder (image bytes -> feature map at the trunk's native grid, 8x8 for ResNet-101 at 256) and
Decoder (pools it to the checkpoint's grid, then captions by beam search) are separate deployments,
so each autoscales on its own, and each batches concurrent requests with `@serve.batch`. Their
`user_config` names the checkpoint (a folder or s3:// prefix written by `raycap.train`) and the
batching knobs (and the Encoder's `cpu_bfloat16`); changing it in the config file and deploying
again calls `reconfigure`, which loads the new checkpoint while the old one serves and then swaps it
in, without dropping requests (one caught between an Encoder and a Decoder on different trunks is
encoded again). The encoder always runs the encoder config recorded in the checkpoint.

Several models at once (Serve model multiplexing): the Decoder's `user_config.models` names them
(name -> checkpoint, e.g. attention and gru, or two versions) with a `default_model`; a request picks
one with the `model` query parameter or Serve's `serve_multiplexed_model_id` header, and each Decoder
replica keeps the MAX_MODELS_PER_REPLICA most recently used loaded (Serve routes a request to a
replica that holds its model). They must share the Encoder's trunk (arch, weights, image size; the
grid may differ, each model pools the one feature map to its own): one Encoder deployment computes
one feature map per image, so checkpoints of another trunk are refused when the Decoder is
(re)configured, and belong in another application. Changing one model's checkpoint swaps it in place.

HTTP (the ingress, `Captioner`):
    POST /caption          one image: the raw body, or one file of a multipart/form-data upload
    POST /caption/batch    several images as multipart/form-data files
        query: beam_size, num_captions (<= beam_size), attention, allow_unk (defaults: CaptionOptions)
        query: model (default: the config's default_model; or the serve_multiplexed_model_id header)
        any other query parameter (a typo: ?beamsize=5) gets 422 naming it and the known ones
        -> {caption, score, model, beams?: [{caption, score, attention?}], attention?: (words, grid, grid)}
        an unknown model gets 404 with the served models' names
    GET  /models           {models: [{name, checkpoint}], default}: the models this application serves
    GET  /model            a model's (?model=NAME, else the default's) checkpoint, vocabulary size, configs
    GET  /healthz          liveness, never authenticated
    GET  /                 a page for people: pick an image, see its captions and attention maps
                           (raycap/static/, calling /models and /caption like any client)
    GET  /docs, /redoc     API docs, Swagger UI and ReDoc served from the package (no CDN)

Bad input gets a 4xx whose JSON body is always `{"detail": "<what was wrong and how to fix it>"}`:
undecodable bytes 400, unknown model 404, too large 413, too many images 413, bad options or an
unknown query parameter 422. Oversized bodies are refused as they stream in (`raycap.serve_http`).

Authentication is off unless the replicas find a token: RAYCAP_API_TOKEN_FILE naming a file that
holds it, or RAYCAP_API_TOKEN in the environment Ray was started in (`raycap.serve_http` says how,
and why not in a runtime_env). Then every path but /healthz and the page's own files (/ and
/static/*), the API docs (/docs, /redoc, /openapi.json) included, needs `Authorization: Bearer
<token>` (the scheme in any case), else 401, checked before routing. The page asks for the token.

The ingress (HTTP and `caption_images` alike) sends an image again when its Encoder or Decoder
replica dies, or its node is lost, mid-request (captioning is idempotent; Serve routes the retry to
a live replica), up to REPLICA_ATTEMPTS tries in all, so a lost replica costs clients latency, not
errors.

Metrics (Ray's, scraped from each node's metrics export port as `ray_<name>`): Serve's own request
counts and latencies (`serve_num_http_requests`, `serve_deployment_processing_latency_ms`, ...) and
Serve batch sizes (`serve_actual_batch_size`), plus `raycap_model_batch_size` (images per model call:
a Serve batch splits by checkpoint and options), `raycap_captions` (images by outcome) and
`raycap_replica_retries` (requests sent again after a replica was lost).

Other Ray code calls the same deployments through handles: the ingress,
`serve.get_app_handle("raycap").caption_images.remote([jpeg_bytes], CaptionOptions())`, or the two
stages, `decoder.caption.remote(await encoder.remote(jpeg_bytes), CaptionOptions())` with
`encoder = serve.get_deployment_handle("Encoder", "raycap")` and the same for "Decoder" (the
Encoder's reply awaited first: chained into the Decoder call, a reply lost with its node hangs that
call). The bulk job (`raycap.bulk`) decodes on its own CPU workers and sends pixels:
`encoder.encode_pixels.remote(array)`.
To deploy serve_config.yaml from Python, with another checkpoint or port: `raycap.serve_deploy`.
"""

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import torch
from fastapi import HTTPException, Query, Request
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, model_validator
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from raycap.data.images import DEFAULT_MAX_PIXELS, ImageError
from raycap.data.vocab import Vocab
from raycap.models.beam import Caption, beam_search
from raycap.models.checkpoint import CaptionModel, load_checkpoint, read_meta
from raycap.models.decoding import MAX_DECODE_LEN
from raycap.models.encoder import Encoder
from raycap.models.encoder_config import EncoderConfig
from raycap.serve_http import (
    CLIENT_ERRORS,
    MULTI_IMAGE_BODY,
    MULTIPART_OVERHEAD,
    SECURED,
    SINGLE_IMAGE_BODY,
    BearerTokenAuth,
    QueryParams,
    TooManyFiles,
    add_page,
    api_token,
    is_multipart,
    multipart_files,
    plain_errors,
    read_body,
)
from raycap.serve_schema import (
    BatchResponse,
    Beam,
    CaptionOptions,
    CaptionResponse,
    InvalidOptions,
    LimitExceeded,
    ModelInfo,
    ModelList,
    ModelMismatch,
    ServedModel,
    UnknownModel,
)

SWAP_WAIT_S = 30.0  # how long a request waits for Encoder and Decoder to agree after a checkpoint swap
# Tries per image when its replica dies mid-request (Serve routes each try to a live replica). Two:
# losing a replica is rare, while an input that kills its replica (an OOM, a crash in a decoder
# library) would take down one more replica with every further try.
REPLICA_ATTEMPTS = 2
# Models a Decoder replica keeps loaded (LRU; Serve's multiplexing): a decoder is 10-100 MB, and
# Serve routes each request to a replica that holds its model when one does.
MAX_MODELS_PER_REPLICA = 4
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64]

logger = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's log file

K = TypeVar("K", bound=Hashable)


# --- configuration -----------------------------------------------------------------------------


class AppArgs(BaseModel):
    """Application `args:` in serve_config.yaml: request limits, fixed for the application's life.
    HTTP requests and the bulk job (`raycap.bulk`, through `Captioner.limits`) share them."""

    model_config = ConfigDict(extra="forbid")

    max_image_bytes: PositiveInt = 10 * 2**20  # larger uploads get 413
    max_images_per_request: PositiveInt = 16  # more files in /caption/batch get 413
    max_beam_size: PositiveInt = 10  # larger beam_size gets 422
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS  # larger decoded images get 400 (decompression bombs)

    def check_options(self, options: CaptionOptions) -> None:
        """Raise InvalidOptions for options beyond these limits."""
        if not 1 <= options.beam_size <= self.max_beam_size:
            raise InvalidOptions(f"beam_size must be between 1 and {self.max_beam_size}, got {options.beam_size}")
        if not 1 <= options.num_captions <= options.beam_size:
            raise InvalidOptions(
                f"num_captions must be between 1 and beam_size ({options.beam_size}), got {options.num_captions}"
            )


class ReplicaSettings(BaseModel):
    """What both model deployments' `user_config` hold; changing it reconfigures replicas in place."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str  # folder, ~/folder or s3://bucket/prefix; the encoder config is read from it
    max_batch_size: PositiveInt = 16
    batch_wait_timeout_s: NonNegativeFloat = 0.01


class EncoderSettings(ReplicaSettings):
    """The Encoder deployment's `user_config`."""

    # The trunk in bfloat16 on CPU (a GPU runs it in float16 anyway): 2.5x faster on CPUs with
    # bfloat16 units (AMX, AVX512-BF16), several times slower on others; captions may differ from
    # float32's where beams nearly tie (bench/serve_cpu.py).
    cpu_bfloat16: bool = False


class DecoderSettings(ReplicaSettings):
    """The Decoder deployment's `user_config`: one `checkpoint` (served as `model_name`), or several
    `models` with a `default_model`, all on the Encoder's trunk."""

    checkpoint: str | None = None  # one model; or `models`
    model_name: str | None = None  # the one checkpoint's name in responses; default: its folder's name
    models: dict[str, str] = {}  # name -> checkpoint: several models, picked per request
    default_model: str | None = None  # the model of requests that name none; default: the first in `models`
    max_decode_len: PositiveInt = MAX_DECODE_LEN  # words per caption at most

    @model_validator(mode="after")
    def _one_form(self) -> "DecoderSettings":
        if (self.checkpoint is None) == (not self.models):
            raise ValueError("set either checkpoint (one model) or models (name: checkpoint, several), not both")
        if self.models and self.model_name is not None:
            raise ValueError("model_name names the one checkpoint; with models, the keys are the names")
        if self.default_model is not None and self.default_model not in self.table():
            raise ValueError(f"default_model {self.default_model!r} is not among the models {sorted(self.table())}")
        return self

    def table(self) -> dict[str, str]:
        """Model name -> checkpoint, in the config's order."""
        if self.models:
            return dict(self.models)
        assert self.checkpoint is not None
        return {self.model_name or Path(self.checkpoint.rstrip("/")).name: self.checkpoint}

    def default(self) -> str:
        return self.default_model or next(iter(self.table()))


# --- checkpoints -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, to group a batch by model
class LoadedModel:
    """A checkpoint loaded for serving and the name it is served under."""

    name: str
    checkpoint: str
    model: CaptionModel


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(checkpoint: str, name: str | None = None) -> LoadedModel:
    """Load a checkpoint (folder or s3:// prefix) onto this process's device for serving."""
    model = load_checkpoint(checkpoint, device=_device())
    return LoadedModel(name or Path(checkpoint.rstrip("/")).name, checkpoint, model)


def _trunk(cfg: EncoderConfig) -> tuple[str, str, int]:
    """What fixes the Encoder's feature map; the grid does not (each checkpoint pools to its own)."""
    return cfg.arch, cfg.weights, cfg.image_size


def check_one_trunk(table: dict[str, str]) -> None:
    """Raise ValueError unless every model's checkpoint (name -> checkpoint) was trained on the same
    trunk: one Encoder deployment computes one feature map per image for all of them."""
    trunks: dict[tuple[str, str, int], list[str]] = {}
    for name, checkpoint in table.items():
        trunks.setdefault(_trunk(read_meta(checkpoint).encoder), []).append(name)
    if len(trunks) > 1:
        kinds = "; ".join(f"{', '.join(names)}: {a} {w} at {px}px" for (a, w, px), names in trunks.items())
        raise ValueError(
            f"the models were trained on different encoders ({kinds}); one Encoder deployment computes one "
            "feature map for all of an application's models: serve the others as another application"
        )


class _Slot:
    """A model name's loaded checkpoint, as the multiplexer caches it (by name); `reconfigure`
    swaps `loaded` in place when the name's checkpoint changes."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded


# --- deployments -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Encoded:
    """An image's feature map and the encoder config that produced it."""

    features: np.ndarray  # (P, C) float32 at the native grid; the Decoder pools it to encoder.grid
    encoder: EncoderConfig


def _groups(keys: Sequence[K]) -> dict[K, list[int]]:
    """Positions of equal keys: a batch may mix models or options, which must run apart."""
    groups: dict[K, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def _build_encoder(cfg: EncoderConfig) -> Encoder:
    return Encoder(cfg).to(_device())


def _model_batch_sizes() -> Histogram:
    """Images per model call on this replica: what batching buys. Serve's `serve_actual_batch_size`
    counts requests per batch, before a batch splits by checkpoint and options."""
    return Histogram(
        "raycap_model_batch_size",
        description="Images per model call (encoder forward or beam search), by deployment and replica.",
        boundaries=BATCH_SIZE_BUCKETS,
    )


@serve.deployment(name="Encoder")  # its options (replicas, CPUs, ...) live in serve_config.yaml
class ImageEncoder:
    """Image bytes -> features (P, C), batched; decodes with the one shared preprocessing path."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.max_pixels = max_pixels
        self.encoder: Encoder | None = None
        self.cpu_bfloat16 = False  # set by reconfigure
        self.batch_sizes = _model_batch_sizes()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        settings = EncoderSettings.model_validate(user_config)
        cfg = (await asyncio.to_thread(read_meta, settings.checkpoint)).encoder
        if self.encoder is None or self.encoder.cfg != cfg:
            self.encoder = await asyncio.to_thread(_build_encoder, cfg)  # requests keep using the old one
        self.cpu_bfloat16 = settings.cpu_bfloat16
        bfloat16_units = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        if self.cpu_bfloat16 and _device().type == "cpu" and not bfloat16_units:
            logger.warning("cpu_bfloat16 is on, but this CPU lacks bfloat16 units (AMX, AVX512-BF16): expect it slower")
        self.encode_batch.set_max_batch_size(settings.max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    def _loaded(self) -> Encoder:
        if self.encoder is None:
            raise RuntimeError("Encoder has no checkpoint: set user_config.checkpoint (see serve_config.yaml)")
        return self.encoder

    async def __call__(self, image: bytes) -> Encoded:
        """Raises ImageError (the reason in its message) for bytes that are not a usable image."""
        encoder = self._loaded()
        array, _ = await asyncio.to_thread(encoder.preprocess, image, self.max_pixels)  # (S, S, 3) uint8
        return await self.encode_batch((encoder, array))

    async def encode_pixels(self, image: np.ndarray) -> Encoded:
        """An image already decoded and resized by `load_image` (the bulk job does that on CPU
        workers): (S, S, 3) uint8 -> features. Raises ModelMismatch for another image size."""
        encoder = self._loaded()
        size = encoder.cfg.image_size
        if image.shape != (size, size, 3) or image.dtype != np.uint8:
            raise ModelMismatch(f"expected a ({size}, {size}, 3) uint8 image, got {image.shape} {image.dtype}")
        return await self.encode_batch((encoder, image))

    @serve.batch  # its size and wait come from user_config (ReplicaSettings), set by reconfigure
    async def encode_batch(self, items: list[tuple[Encoder, np.ndarray]]) -> list[Encoded]:
        out: list[Encoded] = [None] * len(items)  # type: ignore[list-item]
        for encoder, rows in _groups([encoder for encoder, _ in items]).items():
            images = np.stack([items[i][1] for i in rows])  # (B, S, S, 3) uint8
            self.batch_sizes.observe(len(rows))
            # inline: see CaptionDecoder.decode_batch
            features = encoder.encode(images, cpu_bfloat16=self.cpu_bfloat16).cpu().numpy()  # (B, P, C)
            for row, i in enumerate(rows):
                out[i] = Encoded(features[row], encoder.cfg)
        return out


def _attention_maps(caption: Caption, vocab: Vocab, grid: int) -> list[list[list[float]]] | None:
    """One (grid, grid) map per word of the decoded caption; None for decoders without attention."""
    if caption.alphas is None:
        return None
    words = [i for i, token in enumerate(caption.tokens) if token not in (vocab.start_id, vocab.pad_id)]  # as decode
    return caption.alphas[words].view(-1, grid, grid).tolist()  # (words, grid, grid)


def _response(loaded: LoadedModel, captions: list[Caption], options: CaptionOptions) -> CaptionResponse:
    vocab, grid = loaded.model.vocab, loaded.model.encoder_cfg.grid
    beams = [
        Beam(
            caption=vocab.decode_text(c.tokens),
            score=c.score,
            attention=_attention_maps(c, vocab, grid) if options.attention else None,
        )
        for c in captions
    ]
    best = beams[0]
    many = beams if options.num_captions > 1 else None
    return CaptionResponse(
        caption=best.caption, score=best.score, model=loaded.name, beams=many, attention=best.attention
    )


@serve.deployment(name="Decoder")  # its options live in serve_config.yaml
class CaptionDecoder:
    """Features -> captions by batched beam search, with the model each request names (Serve's
    multiplexed model ID; none: the default), at most MAX_MODELS_PER_REPLICA loaded, least recently
    used dropped first."""

    def __init__(self) -> None:
        self.table: dict[str, str] = {}  # model name -> checkpoint; set by reconfigure
        self.default = ""
        self.slots: weakref.WeakValueDictionary[str, _Slot] = weakref.WeakValueDictionary()  # those cached
        self.max_decode_len = 0
        self.batch_sizes = _model_batch_sizes()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Raises ValueError (the deployment fails, saying why) for models on different trunks."""
        settings = DecoderSettings.model_validate(user_config)
        table = settings.table()
        await asyncio.to_thread(check_one_trunk, table)
        self.table, self.default = table, settings.default()
        for name, slot in list(self.slots.items()):  # a changed checkpoint: load it, then swap (requests go on)
            if name in table and slot.loaded.checkpoint != table[name]:
                slot.loaded = await asyncio.to_thread(load_model, table[name], name)
        await self._slot(self.default)  # a default that cannot load fails the deployment, not its first request
        self.max_decode_len = settings.max_decode_len
        self.decode_batch.set_max_batch_size(settings.max_batch_size)
        self.decode_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def _load(self, name: str) -> _Slot:
        slot = _Slot(await asyncio.to_thread(load_model, self.table[name], name))
        self.slots[name] = slot
        return slot

    async def _slot(self, name: str) -> _Slot:
        """The named model's slot ("": the default); raises UnknownModel, listing the served ones."""
        if not self.table:
            raise RuntimeError("Decoder has no checkpoint: set user_config.checkpoint (see serve_config.yaml)")
        name = name or self.default
        if name not in self.table:
            raise UnknownModel(f"no model named {name!r}: this application serves {', '.join(self.table)}")
        return await self._load(name)

    async def models(self) -> ModelList:
        return ModelList(
            models=[ServedModel(name=n, checkpoint=c) for n, c in self.table.items()], default=self.default
        )

    async def info(self) -> ModelInfo:
        """The request's model (its multiplexed model ID, else the default)."""
        loaded = (await self._slot(serve.get_multiplexed_model_id())).loaded
        m = loaded.model
        return ModelInfo(
            model=loaded.name,
            checkpoint=loaded.checkpoint,
            vocab_size=len(m.vocab),
            encoder=dataclasses.asdict(m.encoder_cfg),
            decoder=dataclasses.asdict(m.decoder_cfg),
            epoch=m.epoch,
            metrics=m.metrics,
        )

    async def caption(self, encoded: Encoded, options: CaptionOptions) -> CaptionResponse:
        """Caption with the request's model. Raises UnknownModel, InvalidOptions for a beam wider than
        the vocabulary, and ModelMismatch for features of another trunk (a swap half done)."""
        loaded = (await self._slot(serve.get_multiplexed_model_id())).loaded
        result = await self.decode_batch((encoded, options, loaded))
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch  # its size and wait come from user_config (ReplicaSettings), set by reconfigure
    async def decode_batch(
        self, items: list[tuple[Encoded, CaptionOptions, LoadedModel]]
    ) -> list[CaptionResponse | Exception]:
        """One beam search per (model, options) group; a failed item gets its exception."""
        max_decode_len = self.max_decode_len
        out: list[CaptionResponse | Exception] = [None] * len(items)  # type: ignore[list-item]
        keys: list[tuple[LoadedModel | None, CaptionOptions]] = []  # None: failed
        for i, (encoded, options, loaded) in enumerate(items):
            key: LoadedModel | None = loaded
            if _trunk(loaded.model.encoder_cfg) != _trunk(encoded.encoder):
                out[i] = ModelMismatch(f"model {loaded.name} was not trained on encoder {encoded.encoder}")
                key = None
            elif options.beam_size > (words := len(loaded.model.vocab) - (not options.allow_unk)):
                out[i] = InvalidOptions(f"beam_size {options.beam_size} exceeds the words captions may use ({words})")
                key = None
            keys.append((key, options))
        for (loaded, options), rows in _groups(keys).items():
            if loaded is None:
                continue
            features = torch.from_numpy(np.stack([items[i][0].features for i in rows])).to(_device())  # (B, P, C)
            self.batch_sizes.observe(len(rows))
            vocab = loaded.model.vocab
            # Inline on the replica's event loop, as in Serve's batching examples: in a worker thread,
            # beam search's many small ops hold the GIL so often that the loop hardly enqueues the
            # requests arriving meanwhile, and batches stay at 1-3 instead of filling up.
            captions = beam_search(
                loaded.model.decoder, features, vocab.start_id, vocab.end_id,
                beam_size=options.beam_size, max_len=max_decode_len, num_captions=options.num_captions,
                banned=() if options.allow_unk else (vocab.unk_id,),
            )  # fmt: skip
            for row, i in enumerate(rows):
                out[i] = _response(loaded, captions[row], options)
        return out


# --- ingress -----------------------------------------------------------------------------------

api = FastAPIOffline(  # FastAPI with /docs and /redoc loading Swagger UI and ReDoc from the package
    title="raycap",
    summary="Image captioning (Show, Attend and Tell) on Ray Serve",
    description=(
        "Authentication: when the server has a token, send `Authorization: Bearer <token>` on every path "
        "but /healthz and the page's files (/, /static/*), these docs and /openapi.json included."
    ),
    static_url="/static/docs",
)
api.add_middleware(BearerTokenAuth)
plain_errors(api)
add_page(api)
_DEFAULT = CaptionOptions()  # the query's defaults, as for Python callers


class ModelQuery(QueryParams):
    """The query of GET /model."""

    model: str | None = Field(
        None, description="the model to answer (GET /models); else the serve_multiplexed_model_id header"
    )

    def model_name(self) -> str:
        """The requested model's name; "" for the default."""
        return self.model or serve.get_multiplexed_model_id()


class CaptionQuery(ModelQuery):
    """The query of the caption routes: the model and its decoding options."""

    beam_size: int = Field(_DEFAULT.beam_size, ge=1, description="beams kept per step, at most the app's max_beam_size")
    num_captions: int = Field(_DEFAULT.num_captions, ge=1, description="captions to return, best first; <= beam_size")
    attention: bool = Field(_DEFAULT.attention, description="return attention maps, (words, grid, grid) per caption")
    allow_unk: bool = Field(_DEFAULT.allow_unk, description="let captions hold <unk>, the word for every rare word")

    def options(self) -> CaptionOptions:
        return CaptionOptions(self.beam_size, self.num_captions, self.attention, self.allow_unk)


API = {"dependencies": SECURED, "responses": CLIENT_ERRORS}  # every route but /healthz and the page


def _cause(exc: BaseException) -> BaseException:
    """The exception a deployment raised, without Ray's wrappers (which repeat remote tracebacks)."""
    while isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc


def _replica_lost(exc: BaseException) -> bool:
    """Whether a request failed because an Encoder or Decoder replica died or became unreachable
    (the replica it ran on, or the upstream one whose result it waited for), not because of its input."""
    cause = _cause(exc)
    return isinstance(cause, RayActorError) or isinstance(cause.__cause__, RayActorError)


def _outcome(exc: BaseException) -> str:
    """The `raycap_captions` outcome of a failed caption request."""
    kinds = {
        ImageError: "bad_image", InvalidOptions: "invalid_options", LimitExceeded: "too_large",
        UnknownModel: "unknown_model",
    }  # fmt: skip
    return next((outcome for kind, outcome in kinds.items() if isinstance(exc, kind)), "error")


@serve.deployment(name="Captioner")  # its options live in serve_config.yaml
@serve.ingress(api)
class Captioner:
    """HTTP API and Python entry point: images -> Encoder -> Decoder, through deployment handles."""

    def __init__(self, encoder: DeploymentHandle, decoder: DeploymentHandle, args: AppArgs) -> None:
        self.encoder, self.decoder, self.args = encoder, decoder, args
        api_token()  # an unreadable token file fails the deployment here, not each request
        self.captions = Counter(
            "raycap_captions",
            description="Images in caption requests, by outcome: ok, or why their request failed.",
            tag_keys=("outcome",),
        )
        self.retries = Counter(
            "raycap_replica_retries",
            description="Images sent again because an Encoder or Decoder replica was lost mid-request.",
        )

    def _check(self, images: Sequence[bytes], options: CaptionOptions) -> None:
        """Raise InvalidOptions for options, or LimitExceeded for image counts/sizes, beyond the limits."""
        a = self.args
        a.check_options(options)
        if len(images) > a.max_images_per_request:
            raise LimitExceeded(f"{len(images)} images exceed the limit of {a.max_images_per_request} per request")
        for i, image in enumerate(images):
            if len(image) > a.max_image_bytes:
                raise LimitExceeded(f"image {i + 1} has {len(image)} bytes, over the limit of {a.max_image_bytes}")

    async def caption_images(
        self, images: Sequence[bytes], options: CaptionOptions = CaptionOptions(), model: str = ""
    ) -> list[CaptionResponse]:
        """Caption images (encoded bytes, any PIL format) with the named model ("": the default).
        Raises InvalidOptions, LimitExceeded, UnknownModel, or ImageError for an unusable image (its
        message names which, when there are several)."""
        try:
            self._check(images, options)
            labels = [f"image {i + 1}: " if len(images) > 1 else "" for i in range(len(images))]
            decoder = self.decoder.options(multiplexed_model_id=model)
            results = await asyncio.gather(
                *(self._caption_one(decoder, x, options, label) for x, label in zip(images, labels))
            )
        except Exception as exc:
            self._count(len(images), _outcome(exc))
            raise
        self._count(len(results), "ok")
        return list(results)

    def _count(self, images: int, outcome: str) -> None:
        if images:  # Ray counters refuse increments of 0
            self.captions.inc(images, tags={"outcome": outcome})

    async def _caption_one(
        self, decoder: DeploymentHandle, image: bytes, options: CaptionOptions, label: str
    ) -> CaptionResponse:
        """Encode and decode one image, again while a checkpoint swap is half done (for up to
        SWAP_WAIT_S) and after a replica is lost mid-request (up to REPLICA_ATTEMPTS tries in all)."""
        deadline = time.monotonic() + SWAP_WAIT_S
        attempt = 1
        while True:
            try:
                # Awaited here, not chained into the Decoder call: an Encoder reply lost with its node
                # is an ActorUnavailableError, which Serve 2.58's router, when it comes in as the Decoder
                # call's argument, blames on each Decoder replica in turn and retries forever.
                encoded = await self.encoder.remote(image)
                return await decoder.caption.remote(encoded, options)
            except (ImageError, ModelMismatch) as exc:
                cause = _cause(exc)
                if isinstance(cause, ImageError):
                    raise ImageError(f"{label}{cause}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Encoder and Decoder still disagree after {SWAP_WAIT_S} s: {cause}") from None
                await asyncio.sleep(0.2)  # a checkpoint swap is half done: encode again
            except Exception as exc:
                if attempt >= REPLICA_ATTEMPTS or not _replica_lost(exc):
                    raise
                attempt += 1
                self.retries.inc()
                cause = _cause(exc)
                logger.warning(
                    f"{label}a replica was lost mid-request ({type(cause).__name__}); "
                    f"sending it again, try {attempt} of {REPLICA_ATTEMPTS}"
                )

    async def _http_caption(self, images: list[bytes], options: CaptionOptions, model: str) -> list[CaptionResponse]:
        """`caption_images` with client mistakes turned into 4xx responses."""
        try:
            return await self.caption_images(images, options, model)
        except UnknownModel as exc:
            raise HTTPException(404, str(_cause(exc))) from None
        except InvalidOptions as exc:
            raise HTTPException(422, str(_cause(exc))) from None
        except ImageError as exc:
            raise HTTPException(400, str(exc)) from None
        except LimitExceeded as exc:
            raise HTTPException(413, str(exc)) from None

    async def limits(self) -> AppArgs:
        """The application's request limits, for callers that bypass HTTP (the bulk job)."""
        return self.args

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/models", **API)
    async def models(self) -> ModelList:
        return await self.decoder.models.remote()

    @api.get("/model", **API)
    async def model_info(self, query: Annotated[ModelQuery, Query()]) -> ModelInfo:
        try:
            return await self.decoder.options(multiplexed_model_id=query.model_name()).info.remote()
        except UnknownModel as exc:
            raise HTTPException(404, str(_cause(exc))) from None

    @api.post("/caption", response_model_exclude_none=True, openapi_extra=SINGLE_IMAGE_BODY, **API)
    async def caption(self, request: Request, query: Annotated[CaptionQuery, Query()]) -> CaptionResponse:
        options, model, limit = query.options(), query.model_name(), self.args.max_image_bytes
        if not is_multipart(request.headers):
            return (await self._http_caption([await read_body(request, limit)], options, model))[0]
        try:
            files = await multipart_files(request, limit + MULTIPART_OVERHEAD, max_files=1)
        except TooManyFiles:
            raise HTTPException(400, "expected one image file, got several: use /caption/batch for several") from None
        if not files:
            raise HTTPException(400, "expected one image file, got none")
        return (await self._http_caption(files, options, model))[0]

    @api.post("/caption/batch", response_model_exclude_none=True, openapi_extra=MULTI_IMAGE_BODY, **API)
    async def caption_batch(self, request: Request, query: Annotated[CaptionQuery, Query()]) -> BatchResponse:
        if not is_multipart(request.headers):
            raise HTTPException(415, "send the images as files of a multipart/form-data body")
        a = self.args
        limit, max_files = a.max_images_per_request * a.max_image_bytes + MULTIPART_OVERHEAD, a.max_images_per_request
        try:
            files = await multipart_files(request, limit, max_files)
        except TooManyFiles as exc:
            raise HTTPException(413, str(exc)) from None
        if not files:
            raise HTTPException(400, "no image files in the multipart/form-data body")
        return BatchResponse(results=await self._http_caption(files, query.options(), query.model_name()))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application serve_config.yaml imports (`raycap.serve:app_builder`); `args` as in AppArgs."""
    limits = AppArgs.model_validate(args)
    return Captioner.bind(ImageEncoder.bind(limits.max_pixels), CaptionDecoder.bind(), limits)

