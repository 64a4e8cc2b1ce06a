"""The DELF network: a ResNet backbone (two layouts), the attention head and the classifiers; and the
blocks the DELG network (src/model/delg.py) shares with it.

Images are NCHW float32 RGB normalised as (x - 128) / 128. `block3` (the local-feature map) has
1024 channels at stride 32, receptive field 291, padding 145, in both backbone layouts:
- "keras": Keras ResNet50 (what this suite trains): the output of stage 4 subsampled by a 1x1
  stride-2 max-pool, as the TF2 reference's `block3_strides`; stage5 is block4.
- "slim": tf-slim resnet_v1_50 as TF1 delf_v1.py builds it (the released TF DELF models,
  src/model/tf_delf.py): stride 2 in the last unit of each block, explicitly padded strided convs,
  a 'SAME' max-pool, no conv biases before BatchNorm. For DELF it ends at block3 (no "tuning"
  state); DELG adds block4 (3 units, stride 1) and also uses resnet_v1_101 (23 units in block3).
`NetworkSpec` (kind, backbone, depth) names a network; checkpoints and MindIR files record it.

DelfModel states:
- "tuning": images -> descriptor-classifier logits (global average of the whole block4 map);
- "attn":   images -> (attention-classifier logits, autoencoder reconstruction loss or 0);
- "test":   images -> (attention_scores (N,1,h,w), block3 features (N,1024,h,w)).

Convolutions have two numerically equal implementations: MindSpore's native kernels (the
default everywhere, and what export uses) and an im2col + matmul formulation. On CPU the native
kernels are fast only with oneDNN capped at AVX2 (model_utils/device.py does that): on AVX-512
machines MindSpore 2.10's oneDNN otherwise falls back to its reference kernel for every
convolution but 1x1 stride 1 (docs/network.md, "Why the CPU is fast now", has the figures). The matmul form
is the fallback where that cap cannot apply; it is faster than uncapped native kernels in PyNative
mode, slower in graph mode.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

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
BACKBONES = ("keras", "slim")
DEPTHS = (50, 101)  # ResNet depth: the Keras layout is ResNet50 only; tf-slim resnet_v1_50 or resnet_v1_101
MODEL_KINDS = ("delf", "delg")
SLIM_BN_EPSILON = 1e-5  # tf-slim resnet_arg_scope's batch_norm_epsilon
# tf-slim resnet_v1 blocks as delf_v1.py builds them: (name, bottleneck width, output width, stride of
# the last unit); block4 (stride 1, so block3's resolution) exists only where a head reads it (DELG).
SLIM_BLOCKS = (
    ("block1", 64, 256, 2),
    ("block2", 128, 512, 2),
    ("block3", 256, 1024, 2),
    ("block4", 512, 2048, 1),
)
SLIM_UNITS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # units per block, by depth


class NetworkSpec(NamedTuple):
    """Which network a set of weights belongs to; checkpoints and MindIR files record it."""

    kind: str = "delf"  # MODEL_KINDS: DelfModel (here) or DelgModel (src/model/delg.py)
    backbone: str = "keras"  # BACKBONES
    depth: int = 50  # DEPTHS

    def check(self) -> NetworkSpec:
        """ValueError naming what is not a network this suite builds."""
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.depth not in DEPTHS:
            raise ValueError(f"backbone depth must be one of {', '.join(map(str, DEPTHS))}, got {self.depth!r}")
        if self.depth != 50 and (self.backbone != "slim" or self.kind != "delg"):
            raise ValueError(f"depth {self.depth} exists only for imported DELG models (slim backbone); "
                             f"a {self.kind} model with the {self.backbone} backbone is ResNet50")
        return self


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
    """A conv with a switchable kernel implementation: Keras-style ('same' or 'valid', with bias) or
    tf-slim-style (an int: that many zero rows/columns on every side, then 'valid'; no bias).

    Both implementations hold the same `weight` (O, I, kh, kw) and `bias` (O,) parameters (no bias
    with has_bias=False), so checkpoints move freely between them.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: str | int = "valid", impl: str = "native", weight_init=None, has_bias: bool = True) -> None:
        super().__init__()
        if impl not in CONV_IMPLS:
            raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        # ops.conv2d's (pad_mode, padding): an explicit symmetric padding is pad_mode 'pad'.
        self.pad_mode = "pad" if isinstance(padding, int) else padding
        self.explicit_padding = padding if isinstance(padding, int) else 0
        self.impl = impl
        self.out_channels = out_channels
        self.has_bias = has_bias
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = Parameter(initializer(weight_init or XavierUniform(), shape, mindspore.float32),
                                name="weight")
        if has_bias:
            self.bias = Parameter(initializer("zeros", (out_channels,), mindspore.float32), name="bias")

    def construct(self, x: Tensor) -> Tensor:
        y = self._convolve(x)
        if self.has_bias:
            y = ops.bias_add(y, self.bias)
        return y

    def _convolve(self, x: Tensor) -> Tensor:
        if self.impl == "native":
            return ops.conv2d(x, self.weight, None, self.stride, self.pad_mode, self.explicit_padding)
        return self._im2col_matmul(x)

    def _im2col_matmul(self, x: Tensor) -> Tensor:
        k, s = self.kernel_size, self.stride
        if self.padding == "same" and k > 1:
            height, width = x.shape[2], x.shape[3]
            top, bottom = same_padding(height, k, s)
            left, right = same_padding(width, k, s)
            x = ops.pad(x, (left, right, top, bottom))
        elif self.explicit_padding:
            p = self.explicit_padding
            x = ops.pad(x, (p, p, p, p))
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
        return y.reshape(n, self.out_channels, out_h, out_w)


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
    """Keras ResNet50 up to block3 (stride 32); stage5 (`last_stage`) turns block3 into block4."""

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

    def last_stage(self, block3: Tensor) -> Tensor:
        """block4 (2048 channels, block3's resolution)."""
        return self.stage5(block3)


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


class SlimConv(Conv2d):
    """tf-slim conv2d under resnet_arg_scope: conv without bias, BatchNorm (`bn`), optional ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: str | int,
                 relu: bool, bn_epsilon: float, impl: str) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, impl, HeNormal(), has_bias=False)
        self.bn = BatchNorm2d(out_channels, bn_epsilon)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def construct(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self._convolve(x)))


class SlimBottleneck(nn.Cell):
    """tf-slim bottleneck_v1: the stride sits in the 3x3 conv2 (conv2d_same: pad 1 every side, then
    'valid'); the shortcut is a 1x1 conv + BN when the depth changes, else a stride-s subsample."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int,
                 bn_epsilon: float, impl: str) -> None:
        super().__init__()
        self.stride = stride
        self.has_projection = in_channels != out_channels
        if self.has_projection:
            self.shortcut = SlimConv(in_channels, out_channels, 1, stride, "valid", False, bn_epsilon, impl)
        self.conv1 = SlimConv(in_channels, width, 1, 1, "valid", True, bn_epsilon, impl)
        self.conv2 = SlimConv(width, width, 3, stride, 1, True, bn_epsilon, impl)
        self.conv3 = SlimConv(width, out_channels, 1, 1, "valid", False, bn_epsilon, impl)
        self.relu = nn.ReLU()

    def construct(self, x: Tensor) -> Tensor:
        if self.has_projection:
            shortcut = self.shortcut(x)
        elif self.stride > 1:
            shortcut = subsample(x, self.stride)  # slim's 1x1 max-pool with stride s
        else:
            shortcut = x
        return self.relu(shortcut + self.conv3(self.conv2(self.conv1(x))))


class SlimResNetBackbone(nn.Cell):
    """tf-slim resnet_v1_50 or resnet_v1_101 up to block3 (stride 32), and block4 when `with_block4`.
    Parameter names mirror the TF scopes (`conv1.bn.gamma` is resnet_v1_50/conv1/BatchNorm/gamma;
    see src/model/tf_delf.py)."""

    def __init__(self, bn_epsilon: float, impl: str, depth: int = 50, with_block4: bool = False) -> None:
        super().__init__()
        if depth not in SLIM_UNITS:
            raise ValueError(f"slim backbone depth must be one of {sorted(SLIM_UNITS)}, got {depth!r}")
        self.conv1 = SlimConv(3, 64, 7, 2, 3, True, bn_epsilon, impl)  # conv2d_same 7x7/2: pad 3 every side
        # 'SAME' max-pool: TF ignores the padding; MindSpore's 'same' mode pads the same rows and
        # columns (the extra one after), and on ReLU outputs (>= 0) any padding value <= 0 is neutral.
        self.pool1 = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="same")
        in_channels = 64
        blocks = SLIM_BLOCKS if with_block4 else SLIM_BLOCKS[:3]
        for (name, width, out_channels, last_stride), num_units in zip(blocks, SLIM_UNITS[depth], strict=False):
            units = OrderedDict()
            for index in range(num_units):
                stride = last_stride if index == num_units - 1 else 1
                units[f"unit_{index + 1}"] = SlimBottleneck(in_channels, width, out_channels, stride, bn_epsilon, impl)
                in_channels = out_channels
            setattr(self, name, nn.SequentialCell(units))

    def construct(self, x: Tensor) -> Tensor:
        """block3, the local-feature map."""
        x = self.pool1(self.conv1(x))
        return self.block3(self.block2(self.block1(x)))

    def last_stage(self, block3: Tensor) -> Tensor:
        """block4 (2048 channels, block3's resolution; only with `with_block4`)."""
        return self.block4(block3)


def build_backbone(layout: str, depth: int, bn_epsilon: float, impl: str, with_block4: bool) -> nn.Cell:
    """The ResNet of a layout ("keras": ResNet50 with stage5; "slim": resnet_v1_<depth>)."""
    if layout not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {layout!r}")
    if depth not in DEPTHS:
        raise ValueError(f"backbone depth must be one of {DEPTHS}, got {depth!r}")
    if layout == "keras":
        if depth != 50:
            raise ValueError(f"the keras backbone is ResNet50 only (depth {depth} needs the slim layout of the "
                             "imported TF models)")
        return ResNet50Backbone(bn_epsilon, impl)
    return SlimResNetBackbone(bn_epsilon, impl, depth, with_block4)


class AttentionHead(nn.Cell):
    """1x1 conv 1024->512, BN, ReLU, 1x1 conv 512->1, softplus: non-negative attention scores.

    conv1 has a bias in the Keras layout; tf-slim leaves it out (BatchNorm follows)."""

    def __init__(self, in_channels: int, bn_epsilon: float, impl: str, conv1_bias: bool = True) -> None:
        super().__init__()
        self.conv1 = Conv2d(in_channels, 512, 1, impl=impl, weight_init=HeNormal(), has_bias=conv1_bias)
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


def attend(block3: Tensor, attention: AttentionHead, autoencoder: Autoencoder | None
           ) -> tuple[Tensor, Tensor, Tensor]:
    """(attention scores, local descriptors, reconstruction loss) of block3.

    With an autoencoder (DELG) the attention reads its reconstruction and the local descriptors are
    its code; without, both read block3 itself and the loss is 0.
    """
    if autoencoder is None:
        return attention(block3), block3, ops.zeros((), mindspore.float32)
    code, reconstruction = autoencoder(block3)
    return attention(reconstruction), code, ops.square(reconstruction - block3).mean()


class DelfModel(nn.Cell):
    """DELF with the state-dependent forward described in the module docstring.

    `backbone` picks the ResNet50 layout ("keras" or "slim"); `kind`, `backbone_name`, `depth` and
    `bn_epsilon` are kept so that checkpoints and exports can record what network their weights
    belong to (src/model/weights.network_record).
    """

    BLOCK3_CHANNELS = 1024
    kind = "delf"
    depth = 50

    def __init__(self, state: str = "test", num_classes: int = 1000, bn_epsilon: float = KERAS1_BN_EPSILON,
                 conv_impl: str = "native", use_autoencoder: bool = False, autoencoder_dim: int = 128,
                 backbone: str = "keras") -> None:
        super().__init__()
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        if backbone == "slim" and state == "tuning":
            raise ValueError("the slim backbone (imported TF DELF models) ends at block3: it has no block4 to "
                             "tune; the tuning stage needs backbone keras")
        self.state = state
        self.backbone_name = backbone
        self.bn_epsilon = bn_epsilon
        self.use_autoencoder = use_autoencoder
        self.attention_bn_epsilon = bn_epsilon
        self.backbone = build_backbone(backbone, self.depth, bn_epsilon, conv_impl, with_block4=False)
        self.autoencoder = Autoencoder(self.BLOCK3_CHANNELS, autoencoder_dim, conv_impl) if use_autoencoder else None
        self.attention = AttentionHead(self.BLOCK3_CHANNELS, bn_epsilon, conv_impl, conv1_bias=backbone == "keras")
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

    def construct(self, images: Tensor):
        block3 = self.backbone(images)
        if self.state == "tuning":
            block4 = self.backbone.last_stage(block3)
            return self.desc_fc(block4.mean(axis=(2, 3)))
        if self.state == "attn":
            block3 = ops.stop_gradient(block3)
            scores, _, reconstruction_loss = attend(block3, self.attention, self.autoencoder)
            pooled = (l2_normalize_channels(block3) * scores).mean(axis=(2, 3))
            return self.attn_fc(pooled), reconstruction_loss
        scores, local_features, _ = attend(block3, self.attention, self.autoencoder)
        return scores, local_features


def resolve_conv_impl(conv_impl: str) -> str:
    """'auto' is the native kernels on every device (fast on CPU once oneDNN is capped at AVX2)."""
    if conv_impl == "auto":
        return "native"
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be auto, native or matmul, got {conv_impl!r}")
    return conv_impl


def block3_output_size(size: int, backbone: str = "keras") -> int:
    """Side of the block3 map for an input side.

    keras: conv1 'same' /2, max-pool 3/2 'valid', then /2 three times.
    slim: every one of the five stride-2 steps (conv1, the 'SAME' max-pool, the last unit of each
    block) gives ceil(n / 2) rows, so ceil(n / 32) in all.
    """
    if backbone == "slim":
        return math.ceil(size / 32)
    size = math.ceil(size / 2)
    size = (size - 3) // 2 + 1
    for _ in range(3):
        size = math.ceil(size / 2)
    return size


def min_input_side(backbone: str = "keras") -> int:
    """Smallest input side the backbone can run on: the Keras 'valid' 3x3 max-pool needs 3 rows
    after conv1 (an input side of 5); the slim layout pads everything, so 1 pixel will do."""
    return 1 if backbone == "slim" else 5
