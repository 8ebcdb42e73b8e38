"""The serving API's data: its name and config file, request options, responses and errors, apart
from the deployments.

It imports no torch, so code that only calls the deployments through handles (the bulk job's
client actors) or deploys them (`raycap.serve_deploy`) starts fast; `raycap.serve` builds its
deployments on these.
"""

import dataclasses
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from raycap.models.decoding import BEAM_SIZE

APP_NAME = "raycap"  # the application's name in serve_config.yaml
SERVE_CONFIG = str(Path(__file__).resolve().parents[1] / "serve_config.yaml")  # the repo's, beside raycap/


@dataclasses.dataclass(frozen=True)
class CaptionOptions:
    """Per-request decoding options."""

    beam_size: int = BEAM_SIZE
    num_captions: int = 1  # best captions to return, <= beam_size
    attention: bool = False  # return attention maps (attention decoder only)
    allow_unk: bool = False  # let captions hold <unk>, the word for every rare word; banned by default


class InvalidOptions(ValueError):
    """Caption options outside what the application allows; the message says which and why."""


class LimitExceeded(ValueError):
    """Too many images, or an image too large, for the application's limits."""


class ModelMismatch(RuntimeError):
    """Features made by another trunk than the requested model's: a checkpoint swap half done."""


class UnknownModel(LookupError):
    """A request for a model the application does not serve; the message lists those it does."""


class Beam(BaseModel):
    caption: str
    score: float  # log-probability of the words and <end>
    attention: list[list[list[float]]] | None = None  # (words, grid, grid): where each word looked


class CaptionResponse(BaseModel):
    caption: str
    score: float
    model: str
    beams: list[Beam] | None = None  # all num_captions captions, best first, when num_captions > 1
    attention: list[list[list[float]]] | None = None  # the best caption's, when asked for


class BatchResponse(BaseModel):
    results: list[CaptionResponse]  # in upload order


class ServedModel(BaseModel):
    name: str
    checkpoint: str


class ModelList(BaseModel):
    models: list[ServedModel]  # in the config's order
    default: str  # the model of requests that name none


class ModelInfo(BaseModel):
    model: str
    checkpoint: str
    vocab_size: int
    encoder: dict[str, Any]
    decoder: dict[str, Any]
    epoch: int
    metrics: dict[str, Any]
