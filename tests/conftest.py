"""Shared fixtures: the real photos and ground truth that live beside the project in ../shared."""

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; a hard failure (never a skip) when it is missing."""
    if not (SHARED_DATA / "images").is_dir():
        pytest.fail(
            f"test data not found at {SHARED_DATA}: clone the project beside shared/ "
            "(see README, 'Tests')",
            pytrace=False,
        )
    return SHARED_DATA


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
