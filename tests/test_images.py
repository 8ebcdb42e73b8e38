"""Image decoding: every mode becomes RGB, unusable bytes raise ImageError with a reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from raycap.data.images import ImageError, decode_image, load_image, resize


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _jpeg(width: int = 64, height: int = 48) -> bytes:
    """A smooth colour gradient, so the JPEG has real content to truncate."""
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None, None]
    array = np.concatenate(np.broadcast_arrays(x, y, (x // 2 + y // 2)), axis=2)  # (H, W, 3)
    return _encode(Image.fromarray(array), "JPEG", quality=90)


def _zero_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG, written row by row: a few kB on disk, width*height pixels decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed pixels
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _pixels(data: bytes) -> np.ndarray:
    decoded = decode_image(data)
    assert decoded.image.mode == "RGB"
    return np.asarray(decoded.image)


def test_rgb_image_is_not_converted() -> None:
    decoded = decode_image(_jpeg())
    assert decoded.image.mode == "RGB"
    assert decoded.converted_from is None
    assert (decoded.width, decoded.height) == (64, 48)


def test_greyscale_becomes_rgb_with_equal_channels() -> None:
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    decoded = decode_image(_encode(grey, "PNG"))
    assert decoded.converted_from == "L"
    rgb = np.asarray(decoded.image)
    assert rgb.shape == (8, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], np.asarray(grey))


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    decoded = decode_image(_encode(cmyk, "JPEG", quality=95))
    assert decoded.converted_from == "CMYK"
    red, green, blue = np.asarray(decoded.image).reshape(-1, 3).mean(axis=0)
    assert red > 240 and green < 15 and blue < 15


def test_transparent_rgba_pixels_become_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black
    decoded = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert decoded.converted_from == "RGBA"
    rgb = np.asarray(decoded.image)
    np.testing.assert_array_equal(rgb[3, 3], (255, 255, 255))
    np.testing.assert_array_equal(rgb[0, 0], (255, 0, 0))
    assert np.all(np.abs(rgb[0, 1].astype(int) - 127) <= 1)  # blended halfway with white


def test_grey_with_alpha_transparent_pixels_become_white() -> None:
    la = Image.new("LA", (4, 4), (0, 0))
    decoded = decode_image(_encode(la, "PNG"))
    assert decoded.converted_from == "LA"
    assert np.all(np.asarray(decoded.image) == 255)


def test_palette_transparency_becomes_white() -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black, index 1 blue
    palette.putpixel((0, 0), 1)
    decoded = decode_image(_encode(palette, "PNG", transparency=0))
    assert decoded.converted_from == "P"
    rgb = np.asarray(decoded.image)
    np.testing.assert_array_equal(rgb[0, 0], (0, 0, 255))
    np.testing.assert_array_equal(rgb[3, 3], (255, 255, 255))  # black index is the transparent one


def test_palette_without_transparency_keeps_colours() -> None:
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    rgb = _pixels(_encode(palette, "PNG"))
    assert np.all(rgb == (10, 200, 30))


def test_16bit_png_becomes_rgb_spanning_its_range() -> None:
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    decoded = decode_image(_encode(Image.fromarray(ramp), "PNG"))
    assert decoded.converted_from is not None and decoded.converted_from.startswith("I")
    rgb = np.asarray(decoded.image)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb[:, :, 0], ramp / 257.0, atol=1.0)


@pytest.mark.parametrize("value", [65535, 40000, 1000])
def test_16bit_png_keeps_absolute_brightness(value: int) -> None:
    flat = np.full((4, 4), value, dtype=np.uint16)
    rgb = _pixels(_encode(Image.fromarray(flat), "PNG"))
    assert np.all(np.abs(rgb.astype(float) - value / 257.0) <= 1.0)


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    rgb = _pixels(data)
    assert np.all(rgb == (255, 0, 0))


def test_empty_bytes_raise_image_error() -> None:
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")


def test_garbage_bytes_raise_image_error() -> None:
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"this is a caption, not a photo" * 10)


def test_truncated_jpeg_raises_image_error() -> None:
    data = _jpeg(256, 256)
    with pytest.raises(ImageError, match="corrupt"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("side", [20_000, 9_000])  # above PIL's own bomb limit; above ours only
def test_decompression_bomb_png_raises_image_error_without_decoding(side: int) -> None:
    data = _zero_png(side, side)
    assert len(data) < 200_000  # small file, huge image
    with pytest.raises(ImageError, match="too large"):
        decode_image(data)


def test_max_pixels_is_enforced() -> None:
    data = _jpeg(100, 60)
    assert decode_image(data, max_pixels=6000).width == 100
    with pytest.raises(ImageError, match="100x60"):
        decode_image(data, max_pixels=5999)


def test_image_error_is_a_value_error() -> None:
    assert issubclass(ImageError, ValueError)


def test_resize_gives_square_uint8() -> None:
    image = Image.new("RGB", (40, 30), (1, 2, 3))
    array = resize(image, 16)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8
    assert np.all(array == (1, 2, 3))


def test_load_image_resizes_and_reports_original_size() -> None:
    array, decoded = load_image(_jpeg(640, 480), 64)  # JPEG draft decoding applies here
    assert array.shape == (64, 64, 3) and array.dtype == np.uint8
    assert (decoded.width, decoded.height) == (640, 480)


def test_load_image_draft_matches_full_decode_closely() -> None:
    data = _jpeg(640, 480)
    drafted, _ = load_image(data, 64)
    full = resize(decode_image(data).image, 64)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 3.0
