"""Which encoder: the trunks raycap knows, their facts, and `EncoderConfig`, without torch.

Feature specs, job configs and flags need these, and the processes that only decode images, write
shards or print `--help` should not pay for importing torch; the trunks themselves are built in
`raycap.models.encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass

from raycap.config import check_bounds, flag

# arch -> channels of the trunk's last feature map
FEATURE_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "efficientnet_lite0": 1280,
}
OUTPUT_STRIDE = 32  # every trunk above halves its input five times
# ResNets pad each stride-2 layer for its input, so odd sides round up (ceil(x / 2)); EfficientNet-
# Lite pads as for 224x224 whatever the size, so they round down.
ROUNDS_DOWN = {"efficientnet_lite0"}
WEIGHTS_HELP = "'imagenet', 'none', a local .pt/.pth/.safetensors file, or an s3:// URI to one"


@dataclass(frozen=True)
class EncoderConfig:
    """Which trunk, which weights, and the feature grid. Defaults are the reference's."""

    arch: str = flag("--arch", "resnet101", choices=sorted(FEATURE_DIMS))
    weights: str = flag("--weights", "imagenet", help=WEIGHTS_HELP)
    grid: int = flag("--grid", 14, at_least=1, help="the decoder pools features to grid x grid")
    image_size: int = flag("--image-size", 256, at_least=32, help="images are resized to image-size x image-size")

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.arch not in FEATURE_DIMS:
            raise ValueError(f"unknown encoder arch {self.arch!r}: choose one of {sorted(FEATURE_DIMS)}")

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIMS[self.arch]

    @property
    def native_grid(self) -> int:
        """Side of the trunk's feature map at image_size: what the encoder outputs."""
        if self.arch in ROUNDS_DOWN:
            return self.image_size // OUTPUT_STRIDE
        return -(-self.image_size // OUTPUT_STRIDE)
