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


def spread_attention(model: nn.Cell, images: Tensor) -> None:
    """Rescale the last attention conv of a DELG model so that its scores on `images` have mean 0 and
    std 2: softplus then spans about (0.01, 4), where every digit of the attention counts (random
    weights alone give scores far below 0, where softplus is 0 in float32)."""
    _, reconstruction = model.autoencoder(model.backbone(images))
    attention = model.attention
    scores = attention.conv2(attention.relu(attention.bn_conv1(attention.conv1(reconstruction)))).asnumpy()
    gain = 2.0 / scores.std()
    attention.conv2.weight.set_data(Tensor(attention.conv2.weight.asnumpy() * gain))
    attention.conv2.bias.set_data(Tensor(((attention.conv2.bias.asnumpy() - scores.mean()) * gain).astype(np.float32)))
