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
    """The network of `random_checkpoint`, loaded as extraction loads it (native convolutions)."""
    from src.model.weights import build_model

    network = build_model("test", weights_path=str(random_checkpoint), conv_impl="native",
                          required_prefixes=("backbone.", "attention."))
    network.set_train(False)
    return network
