"""Reading images: any file Pillow opens becomes uint8 RGB; finding images by name in a folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from src.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


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


def find_images(images_dir: str | Path, names: Sequence[str] | None = None) -> dict[str, Path]:
    """Image id (file name without suffix, relative to images_dir) -> path, sorted by id."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"image directory not found: {images_dir}")
    found = {
        path.relative_to(images_dir).with_suffix("").as_posix(): path
        for path in sorted(images_dir.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    }
    if names is None:
        if not found:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
        return found
    missing = [name for name in names if name not in found]
    if missing:
        raise InputError(f"image {missing[0]!r} not found in {images_dir} (any of {', '.join(IMAGE_SUFFIXES)})")
    return {name: found[name] for name in names}


def image_id(name: str) -> str:
    """The feature-store id of an image: its name without a known image suffix."""
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix and suffix.lower() in IMAGE_SUFFIXES else name


def find_image(images_dir: str | os.PathLike, name: str) -> Path:
    """The image file `name` in `images_dir`, whatever its (case-insensitive) image suffix."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"images directory {images_dir} does not exist")
    wanted = image_id(name)
    folder, stem = (images_dir / wanted).parent, Path(wanted).name  # ids may hold sub-directories
    entries = folder.iterdir() if folder.is_dir() else ()
    candidates = sorted(
        entry for entry in entries if entry.stem == stem and entry.suffix.lower() in IMAGE_SUFFIXES and entry.is_file()
    )
    if not candidates:
        raise InputError(f"no image named {wanted!r} ({'/'.join(IMAGE_SUFFIXES)}) in {images_dir}")
    if len(candidates) > 1:
        raise InputError(
            f"image name {wanted!r} is ambiguous in {images_dir}: " + ", ".join(c.name for c in candidates)
        )
    return candidates[0]


