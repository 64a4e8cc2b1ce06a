"""Inference-time BatchNorm folding: every convolution followed by a BatchNorm becomes one convolution
with a bias.

In inference a BatchNorm is the per-channel affine map y = s * (x - mean) + beta with
s = gamma / sqrt(moving_variance + epsilon), so after a convolution with weight W and bias b it can
be folded into the convolution: W' = s * W, b' = s * (b - mean) + beta. The network then skips one
full pass over every BatchNorm's feature map (53 in the ResNet50 backbone), in direct extraction,
in exported MindIR files and on the Ascend 310 alike.

The pass is generic: it finds the pairs in the model's own code rather than in a list of layer
names, so new networks built from `Conv2d`, `SlimConv` and `BatchNorm2d` are covered. A pair is a
BatchNorm called directly on the result of a convolution, written as a nested call in a cell's
`construct` (`self.bn2a(self.branch2a(x))`, `self.bn(self._convolve(x))`), or a convolution
followed by a BatchNorm in an `nn.SequentialCell`. Only then is the convolution's output certainly
used by that BatchNorm alone; a BatchNorm written any other way (its input held in a variable, a
convolution cell called twice or shared by two cells) is left as it is: still correct, only slower.

Folding changes the parameters (the BatchNorm's four become one bias), so a folded model is for
inference and export only: never train it or save it as a training checkpoint.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections import Counter

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from src.model.network import Conv2d


class FoldedBatchNorm(nn.Cell):
    """What is left of a BatchNorm folded into the convolution before it: the per-channel bias (and,
    for the record, the epsilon the BatchNorm had)."""

    def __init__(self, bias: np.ndarray, eps: float) -> None:
        super().__init__()
        self.bias = Parameter(Tensor(np.asarray(bias, np.float32)), name="bias")
        self.eps = eps

    def construct(self, x):
        return ops.bias_add(x, self.bias)


@functools.cache
def _nested_calls(cell_type: type) -> tuple[tuple[tuple[str, str], ...], Counter]:
    """((outer attribute, inner attribute) of every `self.outer(self.inner(...))` call in the type's
    construct, and how often each `self.attribute(...)` is called there)."""
    try:
        source = textwrap.dedent(inspect.getsource(cell_type.construct))
    except (OSError, TypeError):  # no source (a built-in cell): no pairs found, nothing folded
        return (), Counter()

    def self_attribute(node: ast.AST) -> str | None:
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"):
            return node.func.attr
        return None

    pairs, calls = [], Counter()
    for node in ast.walk(ast.parse(source)):
        outer = self_attribute(node)
        if outer is None:
            continue
        calls[outer] += 1
        if len(node.args) == 1 and not node.keywords and (inner := self_attribute(node.args[0])) is not None:
            pairs.append((outer, inner))
    return tuple(pairs), calls


def _is_plain_conv(cell: nn.Cell) -> bool:
    """A Conv2d whose call is the convolution plus its bias (not a SlimConv, which adds BN and ReLU)."""
    return isinstance(cell, Conv2d) and type(cell).construct is Conv2d.construct


def _find_pairs(model: nn.Cell) -> list[tuple[nn.Cell, str, Conv2d]]:
    """(parent cell, attribute name of the BatchNorm, the convolution it follows) of every foldable pair."""
    parents = Counter(id(child) for _, cell in model.cells_and_names() for child in cell.cells())
    pairs = []
    for _, cell in model.cells_and_names():
        children = dict(cell.name_cells())
        if isinstance(cell, nn.SequentialCell):
            names = list(children)
            candidates = [(bn, conv) for conv, bn in zip(names, names[1:], strict=False)]
            calls = Counter(names)
        else:
            candidates, calls = _nested_calls(type(cell))
        for bn_name, conv_name in candidates:
            bn = children.get(bn_name)
            if not isinstance(bn, nn.BatchNorm2d) or parents[id(bn)] != 1 or calls[bn_name] != 1:
                continue
            if conv_name == "_convolve" and isinstance(cell, Conv2d):  # a SlimConv: its own raw convolution
                pairs.append((cell, bn_name, cell))
                continue
            conv = children.get(conv_name)
            if conv is not None and _is_plain_conv(conv) and parents[id(conv)] == 1 and calls[conv_name] == 1:
                pairs.append((cell, bn_name, conv))
    return pairs


def _fold_pair(parent: nn.Cell, bn_name: str, conv: Conv2d) -> None:
    bn = getattr(parent, bn_name)
    gamma, beta, mean, variance = (param.asnumpy().astype(np.float64) for param in
                                   (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
    scale = gamma / np.sqrt(variance + bn.eps)
    conv_bias = conv.bias.asnumpy().astype(np.float64) if conv.has_bias else 0.0
    weight = conv.weight.asnumpy().astype(np.float64) * scale[:, None, None, None]
    conv.weight.set_data(Tensor(weight.astype(np.float32)))
    if conv.has_bias:  # its bias moves into the folded one (one bias add, after the convolution)
        conv.has_bias = False
        delattr(conv, "bias")
    setattr(parent, bn_name, FoldedBatchNorm(scale * (conv_bias - mean) + beta, bn.eps))


def fold_batchnorms(model: nn.Cell) -> list[str]:
    """Fold every BatchNorm2d that directly follows a convolution into it, in place; returns the
    names of the folded BatchNorms. The model must be in inference mode (set_train(False))."""
    if model.compile_cache:
        # A compiled graph would keep running the BatchNorms with the folded weights.
        raise ValueError("fold BatchNorms before the model's first graph-mode call")
    pairs = _find_pairs(model)
    if any(getattr(parent, bn_name).training for parent, bn_name, _ in pairs):
        raise ValueError("BatchNorm folding is for inference: call set_train(False) first")
    names = {id(cell): name for name, cell in model.cells_and_names()}
    folded = []
    for parent, bn_name, conv in pairs:
        folded.append(f"{names[id(parent)]}.{bn_name}".lstrip("."))
        _fold_pair(parent, bn_name, conv)
    model.update_parameters_name()  # the new biases get their full names, as every other parameter
    return folded


def count_batchnorms(model: nn.Cell) -> int:
    """How many BatchNorm2d cells the model holds (0 once every one is folded)."""
    return sum(isinstance(cell, nn.BatchNorm2d) for _, cell in model.cells_and_names())
