"""The DELG network (Cao, Araujo, Sim, ECCV 2020): one ResNet gives a global descriptor and DELF-style
local features in one forward pass. Built from the blocks of src/model/network.py.

Images are NCHW float32 RGB normalised as (x - 128) / 128, as for DELF.
- Global head, on block4 (the last ResNet stage, 2048 channels at block3's stride 32): GeM pooling
  (power 3, not trained: (mean(max(x, 1e-6)^3))^(1/3), TF's pooling.gem), then a whitening fully
  connected layer 2048 -> 2048 with bias (TF's `embedding_layer`).
- Local head, on block3 (1024 channels, stride 32): an autoencoder 1x1 conv 1024 -> 128 (linear)
  -> 1024 (ReLU); the attention head (1x1 conv 1024 -> 512 with bias, BatchNorm, ReLU, 1x1 conv
  512 -> 1, softplus) reads the autoencoder's reconstruction; the local descriptor is the 128-D code.

Backbones: "keras" (this suite's Keras ResNet50; stage5 is block4; what DELG trains from) and "slim"
(tf-slim resnet_v1_50 or resnet_v1_101 with block4: 3 units, stride 1; the released TF DELG models,
src/model/tf_delg.py). The attention head's BatchNorm may have its own epsilon
(`attention_bn_epsilon`: the released graphs may mix tf-slim's 1e-5 with Keras's 1e-3).

States:
- "test" (inference, what extraction and export run):
  images -> (attention_scores (N,1,h,w), local_descriptors (N,128,h,w), global_descriptors (N,2048)).
  The global descriptor is the raw whitening output, before any L2 normalisation, as TF's
  `global_descriptors` fetch is per scale; `combine_global_descriptors` makes the image's
  descriptor from the rows of its global scales.
- "delg" (the joint single-stage training; the loss and its weights are the training code's):
  images -> (global_embedding (N,2048) raw whitening output,
             class_cosines (N,C): cosine of the L2-normalised embedding to every L2-normalised row of
               `cosine_weights` (C, 2048), the ArcFace classifier's class weights, held here so that
               checkpoints carry them; margin and scale are the loss's,
             attention_logits (N,C): `attn_fc` on the attention-pooled, channel-L2-normalised block3,
             reconstruction_loss (): mean squared error of the autoencoder's reconstruction of block3).
  block3 passes a stop_gradient before the local head, so only the global loss trains the backbone;
  every parameter but the BatchNorm statistics is trainable.
"""

from __future__ import annotations

import mindspore
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import XavierUniform, initializer

from src.model.network import (
    KERAS1_BN_EPSILON,
    AttentionHead,
    Autoencoder,
    attend,
    build_backbone,
    l2_normalize_channels,
)

DELG_STATES = ("delg", "test")
GEM_POWER = 3.0  # DELG's delg_gem_power; a constant, not a trained parameter
GEM_EPSILON = 1e-6  # pooling.gem's eps
BLOCK3_CHANNELS = 1024
BLOCK4_CHANNELS = 2048


def gem(features: Tensor, power: float = GEM_POWER, eps: float = GEM_EPSILON) -> Tensor:
    """Generalised-mean pooling over H, W of (N, C, H, W): (mean(max(x, eps)^p))^(1/p) -> (N, C)."""
    return ops.pow(ops.pow(ops.maximum(features, eps), power).mean(axis=(2, 3)), 1.0 / power)


def l2_normalize_rows(matrix: Tensor) -> Tensor:
    return matrix / ops.sqrt((matrix * matrix).sum(axis=1, keepdims=True) + 1e-12)


class DelgModel(nn.Cell):
    """DELG with the state-dependent forward described in the module docstring.

    `kind`, `backbone_name`, `depth`, `bn_epsilon` and `attention_bn_epsilon` are what checkpoints
    and exports record (src/model/weights.network_record), so loading builds this network again.
    """

    kind = "delg"
    BLOCK3_CHANNELS = BLOCK3_CHANNELS

    def __init__(self, state: str = "test", num_classes: int = 1000, bn_epsilon: float = KERAS1_BN_EPSILON,
                 conv_impl: str = "native", autoencoder_dim: int = 128, backbone: str = "keras", depth: int = 50,
                 attention_bn_epsilon: float | None = None, embedding_dim: int = BLOCK4_CHANNELS) -> None:
        super().__init__()
        if state not in DELG_STATES:
            raise ValueError(f"a DELG model's state is one of {DELG_STATES} (DELF's tuning and attn stages do not "
                             f"apply: DELG trains in one stage), got {state!r}")
        self.state = state
        self.backbone_name = backbone
        self.depth = depth
        self.bn_epsilon = bn_epsilon
        self.attention_bn_epsilon = attention_bn_epsilon or bn_epsilon
        self.autoencoder_dim = autoencoder_dim
        self.backbone = build_backbone(backbone, depth, bn_epsilon, conv_impl, with_block4=True)
        self.autoencoder = Autoencoder(BLOCK3_CHANNELS, autoencoder_dim, conv_impl)
        # TF DELG's attention conv1 is a Keras Conv2D: it has a bias even though BatchNorm follows.
        self.attention = AttentionHead(BLOCK3_CHANNELS, self.attention_bn_epsilon, conv_impl, conv1_bias=True)
        self.whitening = nn.Dense(BLOCK4_CHANNELS, embedding_dim, weight_init=XavierUniform())
        if state == "delg":
            self.cosine_weights = Parameter(initializer(XavierUniform(), (num_classes, embedding_dim),
                                                        mindspore.float32), name="cosine_weights")
            self.attn_fc = nn.Dense(BLOCK3_CHANNELS, num_classes, weight_init=XavierUniform())
        for param in self.get_parameters():
            # BatchNorm statistics are updated, never trained; nothing trains in the test state.
            param.requires_grad = state == "delg" and "moving_" not in param.name

    def global_descriptor(self, block3: Tensor) -> Tensor:
        """The raw (N, 2048) whitened GeM of block4."""
        return self.whitening(gem(self.backbone.last_stage(block3)))

    def construct(self, images: Tensor):
        block3 = self.backbone(images)
        embedding = self.global_descriptor(block3)
        if self.state == "test":
            scores, local_descriptors, _ = attend(block3, self.attention, self.autoencoder)
            return scores, local_descriptors, embedding
        block3 = ops.stop_gradient(block3)
        scores, _, reconstruction_loss = attend(block3, self.attention, self.autoencoder)
        pooled = (l2_normalize_channels(block3) * scores).mean(axis=(2, 3))
        class_cosines = ops.matmul(l2_normalize_rows(embedding), l2_normalize_rows(self.cosine_weights).T)
        return embedding, class_cosines, self.attn_fc(pooled), reconstruction_loss


def combine_global_descriptors(per_scale: np.ndarray) -> np.ndarray:
    """An image's DELG descriptor from the raw rows of its global scales (S, D): each row
    L2-normalised, summed, L2-normalised (TF DELG's multi-scale global descriptor)."""
    rows = np.asarray(per_scale, dtype=np.float64)
    if rows.ndim != 2 or not len(rows):
        raise ValueError(f"expected (scales, dim) raw global descriptors, got shape {rows.shape}")
    rows = rows / np.sqrt(np.maximum(np.sum(rows * rows, axis=1, keepdims=True), 1e-12))  # tf.nn.l2_normalize
    total = rows.sum(axis=0)
    return (total / np.sqrt(max(float(np.sum(total * total)), 1e-12))).astype(np.float32)
