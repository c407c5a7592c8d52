"""Loading images robustly: every odd file is either made RGB or refused with a reason."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lavender.errors import LavenderError

# An 8000×8000 scan is legitimate; PIL's bomb guard (89 Mpx) would refuse it with a warning.
MAX_PIXELS = 200_000_000


class ImageError(LavenderError, ValueError):
    """An image could not be turned into RGB pixels; the message says why."""


def load_image(source: Any) -> Image.Image:
    """Open ``source`` (a path, raw bytes or a PIL image) as an RGB image.

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted;
    missing, empty, truncated or undecodable files raise :class:`ImageError`.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        image = _open(source)
    return to_rgb(image)


def _open(source: Any) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    if isinstance(source, (bytes, bytearray)):
        handle, name = io.BytesIO(source), "<bytes>"
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError(f"image file not found: {path}")
        if path.stat().st_size == 0:
            raise ImageError(f"image file is empty (0 bytes): {path}")
        handle, name = path, str(path)
    try:
        image = Image.open(handle)
        image.load()  # decode now, so truncation is reported here and not later
    except Image.DecompressionBombError as error:
        raise ImageError(f"image too large: {name} ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"cannot decode image {name}: {error}") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: rescale to 8 bits instead of letting convert() clip at 255
        pixels = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        pixels = np.clip(pixels / high * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
