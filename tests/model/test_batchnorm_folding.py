"""src/model/batchnorm_folding.py: a folded network computes what the unfolded one computes.

BatchNorm statistics are random and far from the identity (a freshly built network's BatchNorms are
almost the identity map, which would hide a wrong fold); outputs are compared on a real photo.
"""

import mindspore
import numpy as np
import pytest
from mindspore import Tensor, nn
from numpy.lib.stride_tricks import sliding_window_view

from src.extraction.images import load_image, resize_image
from src.extraction.pyramid import normalize_images
from src.model.batchnorm_folding import FoldedBatchNorm, count_batchnorms, fold_batchnorms
from src.model.delg import DelgModel
from src.model.export import export_network, run_exported
from src.model.network import BatchNorm2d, Conv2d, DelfModel, SlimConv

TOLERANCE = 1e-5  # of the largest output value
# Every network extraction can build: (kind, backbone, depth) -> its BatchNorms: the ResNet's (Keras
# ResNet50 with stage5: 53; resnet_v1_50 to block3: 43; resnet_v1_101 with block4: 104) + attention's.
NETWORKS = {("delf", "keras", 50): 54, ("delf", "slim", 50): 44, ("delg", "keras", 50): 54,
            ("delg", "slim", 101): 105}


def randomize_batchnorms(model: nn.Cell, seed: int) -> None:
    """Statistics and affine parameters of every BatchNorm well away from the identity map, and conv
    biases non-zero; gamma stays small enough that 16 residual blocks keep their outputs finite."""
    rng = np.random.default_rng(seed)
    ranges = {"gamma": (0.2, 0.6), "beta": (-0.2, 0.2), "moving_mean": (-0.3, 0.3),
              "moving_variance": (0.3, 3.0), "bias": (-0.1, 0.1)}
    for param in model.get_parameters():
        low_high = ranges.get(param.name.rsplit(".", 1)[-1])
        if low_high:
            param.set_data(Tensor(rng.uniform(*low_high, param.shape).astype(np.float32)))


def relative_difference(want: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(want - got).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def photo(images_dir) -> np.ndarray:
    return normalize_images(resize_image(load_image(images_dir / "sacre_coeur1.jpg"), 97, 131)[None])


def network_id(network: tuple[str, str, int]) -> str:
    return "-".join(map(str, network))


def build(network: tuple[str, str, int], seed: int = 0) -> nn.Cell:
    kind, backbone, depth = network
    mindspore.set_seed(seed)
    epsilon = 1e-3 if backbone == "keras" else 1e-5
    if kind == "delg":
        model = DelgModel("test", backbone=backbone, depth=depth, bn_epsilon=epsilon)
    else:
        model = DelfModel("test", backbone=backbone, bn_epsilon=epsilon)
    model.set_train(False)
    randomize_batchnorms(model, seed)
    return model


class ConvThenBatchNorm(nn.Cell):
    def __init__(self, impl: str) -> None:
        super().__init__()
        self.conv = Conv2d(3, 4, 3, 1, "same", impl=impl)
        self.bn = BatchNorm2d(4, 1e-3)

    def construct(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("impl", ["native", "matmul"])
def test_one_folded_pair_equals_conv_and_batchnorm_computed_by_hand(impl):
    cell = ConvThenBatchNorm(impl)
    cell.set_train(False)
    randomize_batchnorms(cell, 1)
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, (1, 3, 6, 7)).astype(np.float32)
    weight, bias = cell.conv.weight.asnumpy(), cell.conv.bias.asnumpy()
    gamma, beta, mean, variance = (p.asnumpy() for p in (cell.bn.gamma, cell.bn.beta, cell.bn.moving_mean,
                                                          cell.bn.moving_variance))
    # The reference: a 3x3 'same' correlation, then (x - mean) / sqrt(variance + eps) * gamma + beta.
    windows = sliding_window_view(np.pad(images[0], ((0, 0), (1, 1), (1, 1))), (3, 3), axis=(1, 2))
    conv = np.einsum("chwij,ocij->ohw", windows, weight) + bias[:, None, None]
    expected = ((conv - mean[:, None, None]) / np.sqrt(variance[:, None, None] + 1e-3) * gamma[:, None, None]
                + beta[:, None, None])

    assert fold_batchnorms(cell) == ["bn"]
    assert isinstance(cell.bn, FoldedBatchNorm) and not cell.conv.has_bias
    got = cell(Tensor(images)).asnumpy()[0]
    assert np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize("network", list(NETWORKS), ids=network_id)
def test_folded_network_equals_the_unfolded_one(network, photo):
    reference, folded = build(network), build(network)
    want = [output.asnumpy() for output in reference(Tensor(photo))]
    assert count_batchnorms(folded) == NETWORKS[network]

    names = fold_batchnorms(folded)

    assert len(names) == NETWORKS[network] and count_batchnorms(folded) == 0
    parameter_names = [param.name for param in folded.get_parameters()]
    assert len(set(parameter_names)) == len(parameter_names)
    assert f"{names[0]}.bias" in parameter_names  # full names, as every other parameter
    got = [output.asnumpy() for output in folded(Tensor(photo))]
    for index, (want_map, got_map) in enumerate(zip(want, got, strict=True)):
        assert want_map.std() > 0, f"output {index}: a constant output would test nothing"
        assert relative_difference(want_map, got_map) < TOLERANCE, f"output {index}"


@pytest.mark.parametrize("network", [("delf", "keras", 50), ("delf", "slim", 50)], ids=network_id)
def test_exported_folded_network_equals_the_unfolded_framework(network, photo, tmp_path):
    reference, folded = build(network, seed=3), build(network, seed=3)
    fold_batchnorms(folded)
    (path,) = export_network(folded, tmp_path / "folded", "MINDIR")
    want = [output.asnumpy() for output in reference(Tensor(photo))]
    got = run_exported(path, photo)
    for want_map, got_map in zip(want, got, strict=True):
        assert relative_difference(want_map, got_map) < TOLERANCE


class Unfoldable(nn.Cell):
    """A BatchNorm after a convolution whose output is also used elsewhere, a BatchNorm fed by a
    variable, and a SlimConv (conv + BN + ReLU in one cell) inside a SequentialCell."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = Conv2d(3, 3, 1)
        self.bn = BatchNorm2d(3, 1e-3)
        self.shared = Conv2d(3, 3, 1)
        self.bn_shared = BatchNorm2d(3, 1e-3)
        self.sequence = nn.SequentialCell([SlimConv(3, 3, 1, 1, "valid", True, 1e-3, "native"), BatchNorm2d(3, 1e-3)])

    def construct(self, x):
        y = self.conv(x)
        y = self.bn(y) + y
        return self.sequence(self.bn_shared(self.shared(x)) + self.shared(y))


def test_only_batchnorms_fed_by_a_convolution_alone_are_folded():
    cell = Unfoldable()
    cell.set_train(False)
    randomize_batchnorms(cell, 4)
    images = Tensor(np.random.default_rng(5).uniform(-1, 1, (1, 3, 5, 6)).astype(np.float32))
    want = cell(images).asnumpy()
    # Only the SlimConv's own BatchNorm: self.bn's conv output is used twice, self.shared is called
    # twice, and a SlimConv's output (after BN and ReLU) is no convolution output for the next BN.
    assert fold_batchnorms(cell) == ["sequence.0.bn"]
    assert np.abs(cell(images).asnumpy() - want).max() < 1e-5 * np.abs(want).max()


def test_folding_is_refused_in_training_mode():
    cell = ConvThenBatchNorm("native")
    cell.set_train(True)
    with pytest.raises(ValueError, match="inference"):
        fold_batchnorms(cell)
    assert count_batchnorms(cell) == 1


def test_folding_a_compiled_graph_is_refused():
    # The compiled graph would go on running its BatchNorms on the folded weights: wrong features.
    cell = ConvThenBatchNorm("native")
    cell.set_train(False)
    mindspore.set_context(mode=mindspore.GRAPH_MODE)
    try:
        cell(Tensor(np.zeros((1, 3, 6, 7), np.float32)))
        with pytest.raises(ValueError, match="before the model's first graph-mode call"):
            fold_batchnorms(cell)
    finally:
        mindspore.set_context(mode=mindspore.PYNATIVE_MODE)
