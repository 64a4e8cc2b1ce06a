"""Seeded random weights for a network under test: every parameter sane (BatchNorm variances and
gammas positive, convolution kernels He-scaled), so every tensor matters to the outputs."""

import numpy as np
from mindspore import Tensor, nn


def randomize(model: nn.Cell, seed: int = 0) -> dict[str, np.ndarray]:
    """Give every parameter of `model` seeded random values; returns them by parameter name."""
    rng = np.random.default_rng(seed)
    values = {}
    for param in model.get_parameters():
        value = rng.standard_normal(param.shape).astype(np.float32) * 0.05
        if param.name.endswith("moving_variance"):
            value = rng.uniform(0.5, 1.5, param.shape).astype(np.float32)
        if param.name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, param.shape).astype(np.float32)
        if param.name.endswith("weight") and len(param.shape) == 4:
            fan_in = int(np.prod(param.shape[1:]))
            value = rng.standard_normal(param.shape).astype(np.float32) * np.sqrt(2.0 / fan_in)
        param.set_data(Tensor(value))
        values[param.name] = value
    return values
