"""src/image_io.py: every odd image kind becomes uint8 RGB, or a clear error naming the file."""

import io

import numpy as np
import pytest
from PIL import Image

from model_utils.cli import InputError
from model_utils.files import list_images
from src.extraction.images import load_image


@pytest.fixture(scope="module")
def photo(images_dir):
    return load_image(images_dir / "sacre_coeur1.jpg")


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_grayscale_cmyk_palette_alpha_become_rgb(tmp_path, photo):
    rgb = Image.fromarray(photo[:40, :50])
    for mode in ("L", "CMYK", "P", "RGBA", "LA", "1"):
        suffix = ".jpg" if mode in ("L", "CMYK") else ".png"
        path = _save(rgb.convert(mode), tmp_path / f"{mode}{suffix}")
        loaded = load_image(path)
        assert loaded.shape == (40, 50, 3) and loaded.dtype == np.uint8, mode
    gray = load_image(tmp_path / "L.jpg")
    assert np.array_equal(gray[..., 0], gray[..., 2])


def test_sixteen_bit_png_is_rescaled(tmp_path):
    values = np.linspace(0, 65535, 60 * 40).reshape(60, 40).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    path = _save(image, tmp_path / "depth.png")
    loaded = load_image(path)
    assert loaded.shape == (60, 40, 3)
    assert loaded[0, 0, 0] == 0 and loaded[-1, -1, 0] == 255
    np.testing.assert_allclose(loaded[..., 0], np.round(values / 65535 * 255), atol=1)


def test_exif_orientation_is_applied(tmp_path, photo):
    image = Image.fromarray(photo[:30, :60])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)
    assert load_image(path).shape == (60, 30, 3)


def test_truncated_jpeg_and_non_image_give_clear_errors(tmp_path, photo):
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputError, match="truncated.jpg: truncated or corrupt image"):
        load_image(truncated)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(InputError, match="notes.jpg: not an image file"):
        load_image(text)
    with pytest.raises(InputError, match="image not found"):
        load_image(tmp_path / "absent.png")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (300, 300)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)
    with pytest.raises(InputError, match="bomb.png: refused as a possible decompression bomb"):
        load_image(path)


def test_list_images(tmp_path, photo):
    (tmp_path / "sub").mkdir()
    _save(Image.fromarray(photo[:20, :20]), tmp_path / "a.JPG")
    _save(Image.fromarray(photo[:20, :20]), tmp_path / "sub" / "b.png")
    (tmp_path / "readme.txt").write_text("x")
    assert list(list_images(tmp_path)) == ["a", "sub/b"]
    with pytest.raises(InputError, match="image 'c' not found in"):
        list_images(tmp_path, ["a", "c"])


