"""Reading images: any file Pillow opens becomes uint8 RGB; resizing and cropping them."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model_utils.cli import InputError

# EXIF orientations 5-8 turn the image by 90 degrees: its stored width is its shown height.
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Pixels converted at a time (16-bit and float modes, the copy out of Pillow): bounds the temporaries.
_CONVERT_PIXELS = 2**18


def load_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3): EXIF orientation applied, any mode converted."""
    return read_image(path)[0]


def read_image(path: str | Path,
               needed_size: Callable[[int, int], tuple[int, int]] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 RGB (h, w, 3) of an image file and its full (H, W), both after EXIF orientation.

    `needed_size(H, W)` gives the smallest (h, w) the caller will use; a JPEG at least twice as
    large is then decoded reduced by 2, 4 or 8 (Pillow's draft(): DCT scaling, never below the
    needed size), which bounds the memory of huge photos. Other formats are decoded in full.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        image = Image.open(path)
        width, height = image.size
        swapped = image.getexif().get(_EXIF_ORIENTATION) in _SWAPPING_ORIENTATIONS
        full_size = (width, height) if swapped else (height, width)
        if needed_size is not None and image.format == "JPEG":
            need_h, need_w = needed_size(*full_size)
            need_w, need_h = (need_h, need_w) if swapped else (need_w, need_h)
            if 0 < need_w <= width // 2 and 0 < need_h <= height // 2:
                image.draft(None, (need_w, need_h))
        image.load()
        # In place, and the original dropped as soon as it is converted: copies of a huge image
        # would multiply the peak memory.
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode not in _HIGH_DEPTH_MODES:
            image = _rgb_image(image)
        return to_rgb(image), full_size
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as error:
        # Pillow refuses images over 2 * Image.MAX_IMAGE_PIXELS before decoding them.
        raise InputError(f"{path}: refused as a possible decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as error:
        raise InputError(f"{path}: truncated or corrupt image ({error})") from None


def _rgb_image(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 RGB array of a Pillow image in any mode (16-bit and float modes rescaled to 0..255).

    Converted in strips of _CONVERT_PIXELS: np.asarray of the whole image would hold a second
    full copy (and float64 temporaries, 8 bytes a pixel, for 16-bit images).
    """
    high_depth = image.mode in _HIGH_DEPTH_MODES
    if high_depth:
        top = 65535.0 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 255.0
    else:
        image = _rgb_image(image)
    width, height = image.size
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    step = max(1, _CONVERT_PIXELS // max(1, width))
    for row in range(0, height, step):
        strip = np.asarray(image.crop((0, row, width, min(row + step, height))))
        if high_depth:
            strip = np.clip(np.round(strip.astype(np.float64) / top * 255.0), 0, 255).astype(np.uint8)[..., None]
        rgb[row:row + strip.shape[0]] = strip
    return rgb


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 RGB array (Pillow, as the reference implementations)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def crop_to_box(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The [x1, y1, x2, y2] crop of an image (query bounding boxes), rounded to whole pixels."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return image[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)]


def failure_reason(path: str | Path, error: BaseException | str) -> str:
    """One line naming the image and the problem."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return reason if str(path) in reason else f"{path}: {reason}"
