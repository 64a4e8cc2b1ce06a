"""Small JPEG copies of the report's images (at most THUMBNAIL_SIZE pixels a side), cached by content.

A thumbnail's file name is a checksum of the image file's bytes and of what is drawn on it (a query's
box), so a changed image gets a new thumbnail and an unchanged one is never decoded twice; no
stale thumbnail can be shown. Images are read by the suite's one reader (EXIF orientation
applied; JPEGs decoded at a reduced size).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from model_utils.cli import InputError
from model_utils.files import atomic_output
from src.extraction.images import read_image

THUMBNAIL_SIZE = 256
_VERSION = "1"  # bump when thumbnails are drawn differently
_BOX_COLOUR = (255, 214, 0)


def _fitted(height: int, width: int, limit: int) -> tuple[int, int]:
    scale = min(1.0, limit / max(height, width, 1))
    return max(1, round(height * scale)), max(1, round(width * scale))


class ThumbnailCache:
    """Thumbnails in one folder; `get` returns the file name of an image's thumbnail, made when missing."""

    def __init__(self, folder: str | os.PathLike, size: int = THUMBNAIL_SIZE) -> None:
        self.folder = Path(folder)
        self.size = size
        self.used: set[str] = set()
        self._names: dict[tuple[str, tuple[float, ...] | None], str] = {}  # within one report: hash a file once

    def get(self, image_path: str | os.PathLike, box: Sequence[float] | None = None) -> str:
        """The thumbnail's file name in the folder (`box`: [x1, y1, x2, y2] in original pixels, drawn).

        Raises InputError when the image is missing or cannot be read.
        """
        key = (str(image_path), None if box is None else tuple(box))
        if key in self._names:
            return self._names[key]
        try:
            with open(image_path, "rb") as stream:
                digest = hashlib.file_digest(stream, "sha256")
        except OSError as error:
            raise InputError(f"image {image_path} cannot be read: {error.strerror or error}") from None
        digest.update(f"|{_VERSION}|{self.size}|{list(box) if box is not None else ''}".encode())
        name = digest.hexdigest()[:40] + ".jpg"
        self.used.add(name)
        path = self.folder / name
        if not path.is_file():
            self._write(Path(image_path), path, box)
        self._names[key] = name
        return name

    def _write(self, image_path: Path, path: Path, box: Sequence[float] | None) -> None:
        pixels, (height, width) = read_image(image_path, lambda h, w: _fitted(h, w, self.size))
        thumbnail = Image.fromarray(pixels)
        thumb_height, thumb_width = _fitted(height, width, self.size)
        thumbnail = thumbnail.resize((thumb_width, thumb_height), Image.LANCZOS)
        if box is not None:
            x1, y1, x2, y2 = (value * thumb_width / width if index % 2 == 0 else value * thumb_height / height
                              for index, value in enumerate(box))
            ImageDraw.Draw(thumbnail).rectangle((x1, y1, x2, y2), outline=_BOX_COLOUR, width=3)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as temporary:
            thumbnail.save(temporary, format="JPEG", quality=85)
