"""Image decoding and resizing shared by extraction, serving and bulk captioning.

Every path an image takes to the encoder goes through `load_image`, so a caption never depends on
whether the image came from a folder, an S3 bucket or an HTTP upload; extraction and bulk load their
batches of files with `load_images`. Normalisation happens inside the encoder (on its device), so
what travels between stages is a compact uint8 array.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 8000x8000; far above COCO (640x480), below decompression bombs
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """The bytes are not an image we can caption; the message says why."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded RGB image and what was done to get it."""

    image: Image.Image  # mode "RGB"
    width: int  # original size, before any resize
    height: int
    converted_from: str | None  # original PIL mode when it was not RGB (L, CMYK, RGBA, P, I;16, ...)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> DecodedImage:
    """Decode image bytes to RGB, converting grey/CMYK/alpha/palette/16-bit; raise ImageError if unusable.

    `draft_size` lets JPEG decode at a reduced scale (DCT scaling) when the image will be resized to
    at most that size anyway, which is several times faster for large photos.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"image too large: {width}x{height} exceeds {max_pixels} pixels")
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.seek(0)  # first frame of animated GIF/WebP
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt image: {exc}") from None
    mode = image.mode
    if mode == "RGB":
        return DecodedImage(image, width, height, None)
    return DecodedImage(_to_rgb(image), width, height, mode)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent areas become white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit samples: keep absolute brightness
        array = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize(image: Image.Image, size: int) -> np.ndarray:
    """Resize to (size, size) with bilinear filtering, as the reference does: (size, size, 3) uint8."""
    return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, DecodedImage]:
    """Decode and resize image bytes for the encoder: ((size, size, 3) uint8, decode details)."""
    decoded = decode_image(data, max_pixels=max_pixels, draft_size=size)
    return resize(decoded.image, size), decoded


def load_images(
    keys: Sequence[str], read: Callable[[str], bytes], size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, list[DecodedImage | None], np.ndarray]:
    """Read (`read(key)` -> bytes), decode and resize each file; an unusable one gets a reason instead
    of stopping the batch. -> images (B, size, size, 3) uint8 (zeros where unusable), decode details
    (None where unusable), errors (B,) object: "" if ok, else why (ImageError's message, or the read's)."""
    n = len(keys)
    images = np.zeros((n, size, size, 3), np.uint8)  # (B, S, S, 3)
    decoded: list[DecodedImage | None] = [None] * n
    # "" rather than None: an all-None object column would lose its string type in Arrow.
    errors = np.full(n, "", dtype=object)  # (B,)
    for i, key in enumerate(keys):
        try:
            images[i], decoded[i] = load_image(read(key), size, max_pixels)
        except ImageError as exc:
            errors[i] = str(exc)
        except OSError as exc:  # missing file, permissions, network
            errors[i] = f"could not read: {exc}"
        except Exception as exc:  # a decoder bug on one odd file must not stop a million-image run
            errors[i] = f"unexpected {type(exc).__name__} while decoding: {exc}"
    return images, decoded, errors
