"""The DELF network: a Keras-layout ResNet50 backbone, the attention head and the classifiers.

Images are NCHW float32 RGB normalised as (x - 128) / 128. `block3` (the local-feature map) is
the output of stage 4 subsampled by a 1x1 stride-2 max-pool, as the TF2 reference's
`block3_strides`: 1024 channels at stride 32, receptive field 291, padding 145.

States:
- "tuning": images -> descriptor-classifier logits (global average of the whole block4 map);
- "attn":   images -> (attention-classifier logits, autoencoder reconstruction loss or 0);
- "test":   images -> (attention_scores (N,1,h,w), block3 features (N,1024,h,w)).

Convolutions have two numerically equal implementations: MindSpore's native kernels (the
default everywhere, and what export uses) and an im2col + matmul formulation. On CPU the native
kernels are fast only with oneDNN capped at AVX2 (model_utils/device.py does that): on AVX-512
machines MindSpore 2.10's oneDNN otherwise falls back to its reference kernel for every
convolution but 1x1 stride 1 (about 0.1 GFLOP/s). The matmul form is the fallback where that cap
cannot apply; it is faster than uncapped native kernels in PyNative mode, slower in graph mode.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import mindspore
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeNormal, XavierUniform, initializer

CONV_IMPLS = ("native", "matmul")
STATES = ("tuning", "attn", "test")
# (name, number of blocks, bottleneck width, output width, stride of the first block)
STAGES = (
    ("2", 3, 64, 256, 1),
    ("3", 4, 128, 512, 2),
    ("4", 6, 256, 1024, 2),
    ("5", 3, 512, 2048, 1),  # stride 1: block3's subsampling already halved the map (block3_strides)
)
BLOCK_LETTERS = "abcdef"
KERAS1_BN_EPSILON = 1e-3


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/Keras 'same' padding (before, after) along one axis: the extra pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def subsample(x: Tensor, stride: int) -> Tensor:
    """Every `stride`-th row and column (x[:, :, ::s, ::s], whose PyNative gradient on CPU is broken
    in MindSpore 2.10: "StridedSliceGrad ... input memory out of bounds")."""
    return ops.strided_slice(x, (0, 0, 0, 0), x.shape, (1, 1, stride, stride))


class Conv2d(nn.Cell):
    """A Keras-style conv ('same' or 'valid', with bias) with a switchable kernel implementation.

    Both implementations hold the same `weight` (O, I, kh, kw) and `bias` (O,) parameters, so
    checkpoints move freely between them.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: str = "valid", impl: str = "native", weight_init=None) -> None:
        super().__init__()
        if impl not in CONV_IMPLS:
            raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.impl = impl
        self.out_channels = out_channels
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = Parameter(initializer(weight_init or XavierUniform(), shape, mindspore.float32),
                                name="weight")
        self.bias = Parameter(initializer("zeros", (out_channels,), mindspore.float32), name="bias")

    def construct(self, x: Tensor) -> Tensor:
        if self.impl == "native":
            y = ops.conv2d(x, self.weight, None, self.stride, self.padding)
            return y + self.bias.reshape(1, -1, 1, 1)
        return self._im2col_matmul(x)

    def _im2col_matmul(self, x: Tensor) -> Tensor:
        k, s = self.kernel_size, self.stride
        if self.padding == "same" and k > 1:
            height, width = x.shape[2], x.shape[3]
            top, bottom = same_padding(height, k, s)
            left, right = same_padding(width, k, s)
            x = ops.pad(x, (left, right, top, bottom))
        n, c, height, width = x.shape
        out_h = (height - k) // s + 1
        out_w = (width - k) // s + 1
        if k == 1:
            columns = subsample(x, s) if s > 1 else x
            columns = columns.reshape(n, c, out_h * out_w)
        else:
            # Rows ordered (c, i, j), matching weight.reshape(O, I * kh * kw).
            columns = ops.unfold(x, kernel_size=k, dilation=1, padding=0, stride=s)
        y = ops.matmul(self.weight.reshape(self.out_channels, -1), columns)
        return y.reshape(n, self.out_channels, out_h, out_w) + self.bias.reshape(1, -1, 1, 1)


class BatchNorm2d(nn.BatchNorm2d):
    """Keras BatchNormalization (momentum 0.99) with the epsilon of the weights it will hold."""

    def __init__(self, channels: int, epsilon: float) -> None:
        super().__init__(channels, eps=epsilon, momentum=0.99)


class Bottleneck(nn.Cell):
    """ResNet v1 bottleneck (Keras layout: the stride sits in the first 1x1 conv)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int,
                 bn_epsilon: float, impl: str) -> None:
        super().__init__()
        self.branch2a = Conv2d(in_channels, width, 1, stride, impl=impl)
        self.bn2a = BatchNorm2d(width, bn_epsilon)
        self.branch2b = Conv2d(width, width, 3, 1, "same", impl=impl)
        self.bn2b = BatchNorm2d(width, bn_epsilon)
        self.branch2c = Conv2d(width, out_channels, 1, impl=impl)
        self.bn2c = BatchNorm2d(out_channels, bn_epsilon)
        self.has_shortcut_conv = stride != 1 or in_channels != out_channels
        if self.has_shortcut_conv:
            self.branch1 = Conv2d(in_channels, out_channels, 1, stride, impl=impl)
            self.bn1 = BatchNorm2d(out_channels, bn_epsilon)
        self.relu = nn.ReLU()

    def construct(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn2a(self.branch2a(x)))
        y = self.relu(self.bn2b(self.branch2b(y)))
        y = self.bn2c(self.branch2c(y))
        shortcut = self.bn1(self.branch1(x)) if self.has_shortcut_conv else x
        return self.relu(y + shortcut)


class ResNet50Backbone(nn.Cell):
    """Keras ResNet50 up to block3 (stride 32); stage5 turns block3 into block4."""

    def __init__(self, bn_epsilon: float, impl: str) -> None:
        super().__init__()
        self.conv1 = Conv2d(3, 64, 7, 2, "same", impl=impl)
        self.bn_conv1 = BatchNorm2d(64, bn_epsilon)
        self.relu = nn.ReLU()
        self.max_pool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="valid")
        in_channels = 64
        for stage, num_blocks, width, out_channels, stride in STAGES:
            blocks = OrderedDict()
            for index in range(num_blocks):
                blocks[f"res{stage}{BLOCK_LETTERS[index]}"] = Bottleneck(
                    in_channels, width, out_channels, stride if index == 0 else 1, bn_epsilon, impl)
                in_channels = out_channels
            setattr(self, f"stage{stage}", nn.SequentialCell(blocks))

    def construct(self, x: Tensor) -> Tensor:
        """block3, the local-feature map; `stage5(block3)` is block4."""
        x = self.max_pool(self.relu(self.bn_conv1(self.conv1(x))))
        x = self.stage4(self.stage3(self.stage2(x)))
        return subsample(x, 2)  # == MaxPooling2D((1, 1), strides=(2, 2)) of the reference


class Softplus(nn.Cell):
    """softplus(x) = relu(x) + log1p(exp(-|x|)), the same value on every run.

    MindSpore 2.10's CPU Softplus (and Log) kernels round the last bit differently in their SIMD
    body and scalar tail, and how the elements are split over threads varies at run time: the same
    image could get attention scores differing by an ulp from one run (or processing order, or
    shard) to the next. Exp and Log1p do not. `for_onnx` swaps log1p(t) for log(1 + t): MindSpore's
    ONNX exporter has no Log1p (onnxruntime is deterministic anyway).
    """

    def __init__(self) -> None:
        super().__init__()
        self.for_onnx = False

    def construct(self, x: Tensor) -> Tensor:
        tail = ops.exp(-ops.abs(x))
        if self.for_onnx:
            return ops.relu(x) + ops.log(tail + 1.0)
        return ops.relu(x) + ops.log1p(tail)


class AttentionHead(nn.Cell):
    """1x1 conv 1024->512, BN, ReLU, 1x1 conv 512->1, softplus: non-negative attention scores."""

    def __init__(self, in_channels: int, bn_epsilon: float, impl: str) -> None:
        super().__init__()
        self.conv1 = Conv2d(in_channels, 512, 1, impl=impl, weight_init=HeNormal())
        self.bn_conv1 = BatchNorm2d(512, bn_epsilon)
        self.relu = nn.ReLU()
        self.conv2 = Conv2d(512, 1, 1, impl=impl, weight_init=HeNormal())
        self.softplus = Softplus()

    def construct(self, features: Tensor) -> Tensor:
        return self.softplus(self.conv2(self.relu(self.bn_conv1(self.conv1(features)))))


class Autoencoder(nn.Cell):
    """DELG's 1x1 conv bottleneck: 1024 -> reduced (linear) -> 1024 (ReLU)."""

    def __init__(self, channels: int, reduced: int, impl: str) -> None:
        super().__init__()
        self.encoder = Conv2d(channels, reduced, 1, impl=impl)
        self.decoder = Conv2d(reduced, channels, 1, impl=impl)
        self.relu = nn.ReLU()

    def construct(self, features: Tensor) -> tuple[Tensor, Tensor]:
        reduced = self.encoder(features)
        return reduced, self.relu(self.decoder(reduced))


def l2_normalize_channels(features: Tensor) -> Tensor:
    norm = ops.sqrt((features * features).sum(axis=1, keepdims=True) + 1e-12)
    return features / norm


class DelfModel(nn.Cell):
    """DELF with the state-dependent forward described in the module docstring."""

    BLOCK3_CHANNELS = 1024

    def __init__(self, state: str = "test", num_classes: int = 1000, bn_epsilon: float = KERAS1_BN_EPSILON,
                 conv_impl: str = "native", use_autoencoder: bool = False, autoencoder_dim: int = 128) -> None:
        super().__init__()
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        self.state = state
        self.use_autoencoder = use_autoencoder
        self.backbone = ResNet50Backbone(bn_epsilon, conv_impl)
        attention_channels = self.BLOCK3_CHANNELS
        if use_autoencoder:
            self.autoencoder = Autoencoder(self.BLOCK3_CHANNELS, autoencoder_dim, conv_impl)
        self.attention = AttentionHead(attention_channels, bn_epsilon, conv_impl)
        if state != "test":
            self.desc_fc = nn.Dense(2048, num_classes, weight_init=XavierUniform())
            self.attn_fc = nn.Dense(self.BLOCK3_CHANNELS, num_classes, weight_init=XavierUniform())
        self._freeze_for_state()

    def _freeze_for_state(self) -> None:
        """tuning trains backbone + descriptor classifier; attn trains only the attention side."""
        attention_side = ("attention.", "attn_fc.", "autoencoder.")
        for param in self.get_parameters():
            is_attention_side = param.name.startswith(attention_side)
            if "moving_" in param.name:  # BatchNorm statistics are updated, never trained
                param.requires_grad = False
            elif self.state == "tuning":
                param.requires_grad = not is_attention_side
            elif self.state == "attn":
                param.requires_grad = is_attention_side
            else:
                param.requires_grad = False

    def set_train(self, mode: bool = True) -> DelfModel:
        super().set_train(mode)
        if self.state == "attn":
            # The backbone is frozen in this stage: its BatchNorm statistics must not move either.
            self.backbone.set_train(False)
        return self

    def _attention(self, block3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(attention scores, local features, reconstruction loss) from block3."""
        if not self.use_autoencoder:
            return self.attention(block3), block3, ops.zeros((), mindspore.float32)
        reduced, expanded = self.autoencoder(block3)
        reconstruction_loss = ops.square(expanded - block3).mean()
        return self.attention(expanded), reduced, reconstruction_loss

    def construct(self, images: Tensor):
        block3 = self.backbone(images)
        if self.state == "tuning":
            block4 = self.backbone.stage5(block3)
            return self.desc_fc(block4.mean(axis=(2, 3)))
        if self.state == "attn":
            block3 = ops.stop_gradient(block3)
            scores, _, reconstruction_loss = self._attention(block3)
            pooled = (l2_normalize_channels(block3) * scores).mean(axis=(2, 3))
            return self.attn_fc(pooled), reconstruction_loss
        scores, local_features, _ = self._attention(block3)
        return scores, local_features


def resolve_conv_impl(conv_impl: str) -> str:
    """'auto' is the native kernels on every device (fast on CPU once oneDNN is capped at AVX2)."""
    if conv_impl == "auto":
        return "native"
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be auto, native or matmul, got {conv_impl!r}")
    return conv_impl


def block3_output_size(size: int) -> int:
    """Side of the block3 map for an input side: conv1 'same' /2, max-pool 3/2 valid, /2, /2, /2."""
    size = math.ceil(size / 2)
    size = (size - 3) // 2 + 1
    for _ in range(3):
        size = math.ceil(size / 2)
    return size
