"""Reading images: any file Pillow opens becomes uint8 RGB; resizing and cropping them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model_utils.cli import InputError


def load_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3): EXIF orientation applied, any mode converted."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        image = Image.open(path)
        image.load()
        image = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as error:
        # Pillow refuses images over 2 * Image.MAX_IMAGE_PIXELS before decoding them.
        raise InputError(f"{path}: refused as a possible decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{path}: truncated or corrupt image ({error})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 RGB array of a Pillow image in any mode (16-bit and float modes rescaled to 0..255)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 RGB array (Pillow, as the reference implementations)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def crop_to_box(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The [x1, y1, x2, y2] crop of an image (query bounding boxes), rounded to whole pixels."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return image[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)]
