"""Shared fixtures: the real photos and ground truth (../shared/data, or their download cache)."""

from pathlib import Path

import pytest
from data_registry import DataRegistryError, ensure_test_data


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """A folder laid out like ../shared/data (see tests/data_registry.py); a hard failure, never a skip,
    when a file is missing, corrupt or cannot be downloaded."""
    try:
        return ensure_test_data()
    except DataRegistryError as error:
        problem = str(error)
    pytest.fail(problem, pytrace=False)  # outside `except`, so the report is this one line, no chained traceback


@pytest.fixture(scope="session")
def images_dir(shared_data: Path) -> Path:
    return shared_data / "images"


@pytest.fixture(scope="session", autouse=True)
def mindspore_cpu():
    """Every test runs MindSpore on the CPU in PyNative mode unless it switches explicitly."""
    from model_utils.device import setup_device

    setup_device("CPU", graph_mode=False)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """A DELF checkpoint (state 'test') with seeded random weights, in the format training writes."""
    import mindspore

    from src.model.network import KERAS1_BN_EPSILON, DelfModel

    mindspore.set_seed(0)
    model = DelfModel("test")
    path = tmp_path_factory.mktemp("checkpoint") / "delf_random.ckpt"
    mindspore.save_checkpoint(model, str(path), append_dict={"bn_epsilon": KERAS1_BN_EPSILON})
    return path


@pytest.fixture(scope="session")
def random_model(random_checkpoint):
    """The network of `random_checkpoint` with native convolutions (BatchNorms not folded: build_model)."""
    from src.model.weights import build_model

    network = build_model("test", weights_path=str(random_checkpoint), conv_impl="native",
                          required_prefixes=("backbone.", "attention."))
    network.set_train(False)
    return network


@pytest.fixture(scope="session")
def random_delg_checkpoint(tmp_path_factory, images_dir) -> Path:
    """A DELG checkpoint (Keras ResNet50) with seeded random weights, its attention spread over (0.01, 4)
    on a photo (random weights alone give attention 0 everywhere), in the format training writes."""
    import mindspore
    from random_weights import randomize, spread_attention

    from src.extraction.images import load_image
    from src.extraction.pyramid import normalize_images
    from src.model.delg import DelgModel
    from src.model.weights import model_record

    model = DelgModel("test")
    randomize(model, seed=5)
    model.set_train(False)
    photo = load_image(images_dir / "sacre_coeur1.jpg")[100:229, 150:311]
    spread_attention(model, mindspore.Tensor(normalize_images(photo[None])))
    path = tmp_path_factory.mktemp("checkpoint") / "delg_random.ckpt"
    mindspore.save_checkpoint(model, str(path), append_dict=model_record(model))
    return path


@pytest.fixture(scope="session")
def random_delg_model(random_delg_checkpoint):
    """The network of `random_delg_checkpoint`, loaded as extraction loads it (BatchNorms folded)."""
    from src.model.batchnorm_folding import fold_batchnorms
    from src.model.weights import build_model

    network = build_model("test", weights_path=str(random_delg_checkpoint), required_prefixes=("",))
    network.set_train(False)
    fold_batchnorms(network)
    return network
