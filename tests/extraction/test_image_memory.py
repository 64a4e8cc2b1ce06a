"""Bounded memory for huge images (issue 11, item 4): the largest pyramid level is capped, large JPEGs
are decoded only as large as that level needs (Pillow draft), and conversions work in slices.

The figure for real inputs (a 13000 x 13000 PNG, 178 M-pixel RGBA PNGs) is measured with
/usr/bin/time and given in docs/troubleshooting.md; these tests check the mechanisms on small synthetic images.
"""

import tracemalloc

import numpy as np
import pytest
from mindspore import Tensor
from PIL import Image

from model_utils.config import ExtractionConfig
from src.extraction.extractor import DelfExtractor
from src.extraction.images import load_image, read_image
from src.extraction.pyramid import level_sizes, needed_image_size


class FakeNetwork:
    """Stands in for DelfModel: maps of the right shapes (stride 32 -> 1/16 of the input after 'same'),
    recording each input it was given."""

    def __init__(self):
        self.inputs = []

    def set_train(self, mode):
        pass

    def __call__(self, tensor):
        _, _, height, width = tensor.shape
        self.inputs.append((height, width))
        rows, cols = -(-height // 16), -(-width // 16)
        attention = np.ones((1, 1, rows, cols), np.float32)
        features = np.ones((1, 8, rows, cols), np.float32)
        return Tensor(attention), Tensor(features)


def gradient(height, width):
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    cols = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    gray = ((rows + cols) / 2).astype(np.uint8)
    return np.stack([gray, 255 - gray, gray // 2], axis=2)


def test_default_cap_bounds_every_level():
    config = ExtractionConfig()
    assert config.max_pixels_per_scale == 3_500_000  # ~2.7 GB peak for a 13000² PNG (docs/troubleshooting.md)
    for height, width in [(13000, 13000), (40000, 300), (1024, 768), (1024, 1024)]:
        largest = max(h * w for _, h, w in level_sizes(height, width, config))
        assert largest <= config.max_pixels_per_scale * 1.001
    # 4:3 images of up to 1024 px a side (Oxford, Paris) keep the exact reference pyramid at scale 2.
    assert max(level_sizes(768, 1024, config)) == (2.0, 1536, 2048)


def test_large_jpeg_is_decoded_reduced_and_locations_stay_in_full_pixels(tmp_path):
    path = tmp_path / "large.jpg"
    Image.fromarray(gradient(1600, 2400)).save(path, quality=90)
    config = ExtractionConfig(image_scales=(0.25, 0.5), max_pixels_per_scale=300 * 450, use_pca=False,
                              score_threshold=0.0, feature_depth=8)
    need_h, need_w = needed_image_size(1600, 2400, config)
    assert (need_h, need_w) == (300, 450)
    image, full_size = read_image(path, lambda h, w: needed_image_size(h, w, config))
    assert full_size == (1600, 2400)
    assert image.shape[:2] == (400, 600)  # 1/4: the largest reduction still >= 300 x 450
    assert read_image(path)[0].shape[:2] == (1600, 2400)  # without a need, decoded in full

    network = FakeNetwork()
    features, size = DelfExtractor(network, config).extract_file(path)
    assert size == (1600, 2400)
    assert max(network.inputs) == (300, 450)  # the levels are those of the full-size image
    assert features.locations[:, 0].max() > 1200 and features.locations[:, 1].max() > 1800


def test_draft_respects_exif_rotation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 2400 wide, shown 2400 high
    Image.fromarray(gradient(1600, 2400)).save(path, quality=90, exif=exif)
    image, full_size = read_image(path, lambda h, w: (h // 4, w // 4))
    assert full_size == (2400, 1600)
    assert image.shape[:2] == (600, 400)
    np.testing.assert_array_equal(load_image(path).shape, (2400, 1600, 3))


@pytest.mark.parametrize("mode", ["RGBA", "I;16"])
def test_decoding_allocates_little_beyond_the_rgb_result(tmp_path, mode):
    """Python-side peak (NumPy, bytes) of decoding a 2000 x 2000 image stays near its uint8 RGB size;
    np.asarray took 2x, and converting 16-bit images as a whole in float64 took 8x."""
    height = width = 2000
    if mode == "I;16":
        values = (np.arange(height * width, dtype=np.uint32) % 65536).astype(np.uint16).reshape(height, width)
        image = Image.fromarray(values)
        assert image.mode == "I;16"
    else:
        image = Image.fromarray(gradient(height, width)).convert("RGBA")
    path = tmp_path / "big.png"
    image.save(path, compress_level=1)
    tracemalloc.start()
    try:
        rgb, _ = read_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rgb.shape == (height, width, 3)
    assert peak < 1.5 * rgb.nbytes, f"{peak / 2**20:.0f} MB peak for a {rgb.nbytes / 2**20:.0f} MB result"
