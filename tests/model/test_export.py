"""export.py: the exported MindIR / ONNX files compute what the framework computes, on a real photo.

No trained weights exist offline, so a seeded random DelfModel is saved as a checkpoint the way
src/convert_h5_to_weight.py saves one (with bn_epsilon); export reads it like any checkpoint.
"""

import pytest

from export import main
from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from src.ascend310.preprocess import canvas_sides, place_on_canvas
from src.extraction.images import load_image, resize_image
from src.extraction.pyramid import normalize_images
from src.model.export import export_network, max_difference, run_exported
from src.model.network import block3_output_size

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint):
    return random_checkpoint


@pytest.fixture(scope="module")
def model(random_model):
    return random_model


@pytest.fixture(scope="module")
def photo(images_dir):
    # Downsized: PyNative's native convolutions are slow on CPU. 143 rows: an odd side on purpose.
    return resize_image(load_image(images_dir / "sacre_coeur1.jpg"), 143, 200)


def test_dynamic_mindir_reproduces_the_framework_at_any_size(model, photo, tmp_path):
    (path,) = export_network(model, tmp_path / "DELF_MindIR", "MINDIR")
    assert path == tmp_path / "DELF_MindIR.mindir"
    assert not list(tmp_path.glob(".*")), "no temporary file may be left behind"
    for image in (photo, photo[:96, :131]):
        attention, features = run_exported(path, normalize_images(image[None]))
        map_size = tuple(block3_output_size(side) for side in image.shape[:2])
        assert attention.shape == (1, 1, *map_size) and features.shape == (1, 1024, *map_size)
        assert attention.std() > 0 and features.std() > 0
        assert max(max_difference(model, path, normalize_images(image[None]))) < TOLERANCE


def test_static_mindir_per_scale_reproduces_the_framework_on_its_canvas(model, photo, tmp_path):
    config = ExtractionConfig(image_scales=(0.5, 1.0), max_image_size=200)
    sides = canvas_sides(config)
    assert sides == (100, 200)
    paths = export_network(model, tmp_path / "DELF_MindIR", "MINDIR", [(s, s) for s in sides])
    assert [p.name for p in paths] == ["DELF_MindIR_100x100.mindir", "DELF_MindIR_200x200.mindir"]
    canvas, offset = place_on_canvas(normalize_images(photo[None]), 200)
    assert offset == (1, 0)
    assert max(max_difference(model, paths[1], canvas)) < TOLERANCE


def test_onnx_export_runs_in_onnxruntime_with_the_framework_outputs(model, photo, tmp_path):
    import onnxruntime

    (path,) = export_network(model, tmp_path / "DELF", "ONNX", [(200, 200)])
    assert path.name == "DELF_200x200.onnx"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 200, 200]
    canvas, _ = place_on_canvas(normalize_images(photo[None]), 200)
    attention_diff, features_diff = max_difference(model, path, canvas)
    assert attention_diff < TOLERANCE and features_diff < TOLERANCE


def test_onnx_without_static_shapes_is_refused(model, tmp_path):
    with pytest.raises(InputError, match="ONNX exporter has no dynamic shapes"):
        export_network(model, tmp_path / "DELF", "ONNX")


def test_cli_writes_delf_mindir_and_fails_in_one_line(checkpoint, model, photo, tmp_path, capsys):
    target = tmp_path / "DELF_MindIR"
    main(["--ckpt_path", str(checkpoint), "--file_name", str(target), "--device_target", "CPU"])
    assert (tmp_path / "DELF_MindIR.mindir").stat().st_size > 30e6  # ~35 MB of float32 weights
    # The CLI exports the network with its BatchNorms folded: it computes what the unfolded one does.
    assert max(max_difference(model, tmp_path / "DELF_MindIR.mindir", normalize_images(photo[None]))) < TOLERANCE
    assert "DELF_MindIR.mindir" in capsys.readouterr().out

    with pytest.raises(SystemExit) as stop:
        main(["--ckpt_path", str(tmp_path / "missing.ckpt"), "--file_name", str(target)])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "checkpoint not found" in error and "missing.ckpt" in error

    with pytest.raises(SystemExit):
        main(["--ckpt_path", str(checkpoint), "--file_name", str(target), "--input_shape", "static"])
    assert "extraction.max_image_size" in capsys.readouterr().err


def test_cli_exports_delg_with_its_global_output(random_delg_checkpoint, photo, tmp_path, capsys):
    from PIL import Image

    image_path = tmp_path / "photo.png"
    Image.fromarray(photo).save(image_path)
    delg_settings = ["--extraction.feature_depth=128", "--extraction.use_pca=false", "--device_target", "CPU"]
    main(["--ckpt_path", str(random_delg_checkpoint), "--file_name", str(tmp_path / "DELG_MindIR"),
          "--verify_image", str(image_path), *delg_settings])
    printed = capsys.readouterr().out
    assert "DELG_MindIR.mindir" in printed
    differences = printed.split("largest difference to the framework: ")[1].split(", ")
    assert [part.split()[0] for part in differences] == ["attention", "features", "global"]
    attention, features, global_raw = (float(part.split()[1]) for part in differences)
    # Raw (unnormalised) global rows reach ~3e4 with these weights: 0.05 is ~1e-6 of them.
    assert attention < 1e-3 and features < 1e-3 and global_raw < 0.05
    with pytest.raises(SystemExit):
        main(["--ckpt_path", str(random_delg_checkpoint), "--file_name", str(tmp_path / "static"),
              "--input_shape", "static", "--extraction.max_image_size=200", *delg_settings])
    assert "not supported for a DELG model" in capsys.readouterr().err
