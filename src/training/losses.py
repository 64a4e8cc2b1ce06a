"""Training losses: DELF's two stages and DELG's joint loss, each with the values train.py logs beside it.

A loss cell takes (images, labels) and returns (loss, values): `values` is a 1-D tensor, one entry
per name in the cell's `value_names` (the log line prints them as `name: value`,
src/training/curves.py plots them); they take no gradient. `checked_accuracy` names the value
that TrainingMonitor compares with chance level (src/training/step.py). Parameter names stay those
of the model.

- DELF (DelfTrainingLoss): softmax cross-entropy (sparse labels, mean over the batch) of the
  stage's classifier; the attn stage multiplies it by attention_loss_weight and adds
  reconstruction_loss_weight x the autoencoder's reconstruction loss (as the TF reference).
- DELG (DelgTrainingLoss, TF2 train.py with delg_global_features): ArcFace cross-entropy of the
  global descriptor + attention_loss_weight x the attention classifier's cross-entropy +
  reconstruction_loss_weight x the autoencoder's reconstruction MSE, one backward pass (the
  network's stop_gradient at block3 keeps the local losses out of the backbone).
"""

from __future__ import annotations

import math

import mindspore
from mindspore import Tensor, nn, ops

ARCFACE_MARGIN = 0.1  # delg_arcface_margin
ARCFACE_SCALE = 45.25  # delg_scale_factor_init, sqrt(2048); a constant, not trained (tf.Variable(trainable=False))
# acos has an infinite derivative at +-1: cosines are clipped this far inside before it, so that an
# embedding that matches its class weight exactly gets a zero gradient there instead of a NaN.
ACOS_CLIP = 1e-6


def arcface_logits(cosines: Tensor, labels: Tensor, margin: float = ARCFACE_MARGIN,
                   scale: float = ARCFACE_SCALE) -> Tensor:
    """ArcFace logits (Deng et al. 2019; TF DELG's cosine_classifier_logits with training=True).

    cosines (N, C): cosine of the L2-normalised embedding to each L2-normalised class weight.
    The target class's angle theta = acos(cos) becomes theta + margin, where theta <= pi - margin
    (beyond it, adding the margin would raise the cosine again, so it is left as it is, as TF does);
    other classes keep their cosine; everything is multiplied by `scale`.
    """
    cosines = cosines.astype(mindspore.float32)
    theta = ops.acos(ops.clamp(cosines, -1.0 + ACOS_CLIP, 1.0 - ACOS_CLIP))
    target = ops.one_hot(labels, cosines.shape[-1], Tensor(1.0, mindspore.float32),
                         Tensor(0.0, mindspore.float32)) > 0.5
    with_margin = ops.logical_and(target, theta <= math.pi - margin)
    return scale * ops.where(with_margin, ops.cos(theta + margin), cosines)


def batch_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Share of the batch whose highest logit is its label's."""
    return ops.equal(ops.argmax(logits, dim=-1).astype(labels.dtype), labels).astype(mindspore.float32).mean()


class DelfTrainingLoss(nn.Cell):
    """A DELF stage's loss on (images, labels), and the stage classifier's batch accuracy."""

    value_names = ("accuracy",)  # of the stage's classifier on the batch (before the update)
    checked_accuracy = "accuracy"

    def __init__(self, model: nn.Cell, attention_loss_weight: float = 1.0,
                 reconstruction_loss_weight: float = 10.0) -> None:
        super().__init__(auto_prefix=False)
        self.model = model
        self.is_attention_stage = model.state == "attn"
        self.attention_loss_weight = attention_loss_weight
        self.reconstruction_loss_weight = reconstruction_loss_weight
        self.cross_entropy = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

    def construct(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.is_attention_stage:
            logits, reconstruction_loss = self.model(images)
            logits = logits.astype(mindspore.float32)
            loss = self.attention_loss_weight * self.cross_entropy(logits, labels)
            loss = loss + self.reconstruction_loss_weight * reconstruction_loss.astype(mindspore.float32)
        else:
            logits = self.model(images).astype(mindspore.float32)
            loss = self.cross_entropy(logits, labels)
        return loss, ops.stop_gradient(ops.stack([batch_accuracy(logits, labels)]))


class DelgTrainingLoss(nn.Cell):
    """DELG's joint loss on (images, labels) for a DelgModel in the "delg" state.

    Logged values: the three unweighted terms and both classifiers' batch accuracies. The global
    accuracy is the cosine classifier's prediction without the margin (what it predicts at test
    time; TF's training summary used the margin logits, which read lower).
    """

    value_names = ("global_loss", "attention_loss", "reconstruction_loss", "global_accuracy", "attention_accuracy")
    checked_accuracy = "global_accuracy"  # the global loss alone trains the backbone

    def __init__(self, model: nn.Cell, attention_loss_weight: float = 1.0, reconstruction_loss_weight: float = 10.0,
                 arcface_margin: float = ARCFACE_MARGIN, arcface_scale: float = ARCFACE_SCALE) -> None:
        super().__init__(auto_prefix=False)
        self.model = model
        self.attention_loss_weight = attention_loss_weight
        self.reconstruction_loss_weight = reconstruction_loss_weight
        self.arcface_margin = arcface_margin
        self.arcface_scale = arcface_scale
        self.cross_entropy = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

    def construct(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        _, class_cosines, attention_logits, reconstruction_loss = self.model(images)
        class_cosines = class_cosines.astype(mindspore.float32)
        attention_logits = attention_logits.astype(mindspore.float32)
        reconstruction_loss = reconstruction_loss.astype(mindspore.float32)
        global_loss = self.cross_entropy(
            arcface_logits(class_cosines, labels, self.arcface_margin, self.arcface_scale), labels)
        attention_loss = self.cross_entropy(attention_logits, labels)
        loss = (global_loss + self.attention_loss_weight * attention_loss
                + self.reconstruction_loss_weight * reconstruction_loss)
        values = ops.stack([global_loss, attention_loss, reconstruction_loss,
                            batch_accuracy(class_cosines, labels), batch_accuracy(attention_logits, labels)])
        return loss, ops.stop_gradient(values)


def training_loss(model: nn.Cell, attention_loss_weight: float = 1.0, reconstruction_loss_weight: float = 10.0,
                  arcface_margin: float = ARCFACE_MARGIN, arcface_scale: float = ARCFACE_SCALE) -> nn.Cell:
    """The loss cell of a model's training state: DELG's joint loss, or the DELF stage's."""
    if model.state == "delg":
        return DelgTrainingLoss(model, attention_loss_weight, reconstruction_loss_weight, arcface_margin,
                                arcface_scale)
    return DelfTrainingLoss(model, attention_loss_weight, reconstruction_loss_weight)
