"""Reference outputs of a DELG network from TensorFlow itself, for tests/model/test_tf_delg_import.py.

Runs in the test-only TensorFlow venv (scripts/setup_tf_env.sh), never in the project's own
environment:

  make_delg.py OUT_DIR IMAGE.npy SCALES DEPTH RELEASE     (SCALES comma-separated)

builds the DELG inference graph in TF1 style: tf-slim resnet_v1_<DEPTH> (50 or 101) with block4
(3 units, stride 1) under the scope resnet_v1_<DEPTH>, and the heads of TF DELG's model code under
the variable names of src/model/tf_delg.py's table (Keras-style kernel/bias): the autoencoder
(1x1 conv to 128, linear; 1x1 conv to 1024, ReLU) on block3, the attention (1x1 conv 512 with bias,
BatchNorm with Keras's epsilon 1e-3, ReLU, 1x1 conv 1, softplus) on the reconstruction, GeM
(p = 3, eps 1e-6, as pooling.gem) of block4 and the whitening `embedding_layer` (2048 -> 2048 with
bias). Weights and BatchNorm statistics are seeded random. It saves a SavedModel in the release
tarball's layout (OUT_DIR/RELEASE/{saved_model.pb, variables/}) and runs the network the way the TF
extractor does: normalise (x - 128) / 128, tf.image.resize_bilinear (legacy sampling) to
round(H * s) x round(W * s), network. Writes OUT_DIR/reference_<i>.npz per scale (resized input,
attention probabilities, local descriptors, raw global descriptor) and OUT_DIR/global.npy, the
image's descriptor over all the scales: each raw row L2-normalised, summed, L2-normalised.
"""

import sys

import numpy as np
import tensorflow as tf
import tf_slim
from make_delf_v1 import randomize as randomize_slim_names  # also aliases tf-keras's legacy layers for tf-slim
from tf_slim.nets import resnet_utils, resnet_v1

tf.compat.v1.disable_eager_execution()

BLOCK3_UNITS = {50: 6, 101: 23}
ATTENTION_BN_EPSILON = 1e-3  # tf.keras BatchNormalization's default


def backbone(images, depth):
    """(block3, block4) of tf-slim resnet_v1_<depth> as delf_v1.py builds it, plus block4."""
    block = resnet_v1.resnet_v1_block
    blocks = [
        block("block1", base_depth=64, num_units=3, stride=2),
        block("block2", base_depth=128, num_units=4, stride=2),
        block("block3", base_depth=256, num_units=BLOCK3_UNITS[depth], stride=2),
        block("block4", base_depth=512, num_units=3, stride=1),
    ]
    scope = f"resnet_v1_{depth}"
    with tf_slim.arg_scope(resnet_utils.resnet_arg_scope()):
        block4, end_points = resnet_v1.resnet_v1(images, blocks, is_training=False, global_pool=False,
                                                 reuse=tf.compat.v1.AUTO_REUSE, scope=scope)
    return end_points[f"{scope}/block3"], block4


def conv1x1(features, scope, channels, activation=None):
    """A Keras Conv2D(channels, 1, padding='same') with kernel and bias variables under `scope`."""
    with tf.compat.v1.variable_scope(scope):
        kernel = tf.compat.v1.get_variable("kernel", [1, 1, features.shape[-1], channels])
        bias = tf.compat.v1.get_variable("bias", [channels], initializer=tf.compat.v1.zeros_initializer())
    out = tf.nn.bias_add(tf.nn.conv2d(features, kernel, 1, "SAME"), bias)
    return activation(out) if activation else out


def batch_norm(features, scope, epsilon):
    """Keras BatchNormalization in inference: a FusedBatchNorm node with the layer's epsilon."""
    channels = features.shape[-1]
    with tf.compat.v1.variable_scope(scope):
        gamma, beta, mean, variance = (tf.compat.v1.get_variable(name, [channels]) for name in
                                       ("gamma", "beta", "moving_mean", "moving_variance"))
        out, _, _ = tf.compat.v1.nn.fused_batch_norm(features, gamma, beta, mean, variance, epsilon=epsilon,
                                                     is_training=False)
    return out


def delg_network(images, depth):
    """(attention probabilities, attention scores, local descriptors, raw global descriptor)."""
    block3, block4 = backbone(images, depth)
    reuse = tf.compat.v1.AUTO_REUSE
    with tf.compat.v1.variable_scope("autoencoder", reuse=reuse):
        code = conv1x1(block3, "autoenc_conv1", 128)
        reconstruction = conv1x1(code, "autoenc_conv2", 1024, tf.nn.relu)
    with tf.compat.v1.variable_scope("attention", reuse=reuse):
        hidden = tf.nn.relu(batch_norm(conv1x1(reconstruction, "attn_conv1", 512), "bn_conv1", ATTENTION_BN_EPSILON))
        score = conv1x1(hidden, "attn_conv2", 1)
    pooled = tf.pow(tf.reduce_mean(tf.pow(tf.maximum(block4, 1e-6), 3.0), axis=[1, 2]), 1.0 / 3.0)  # pooling.gem
    with tf.compat.v1.variable_scope("embedding_layer", reuse=reuse):
        kernel = tf.compat.v1.get_variable("kernel", [2048, 2048])
        bias = tf.compat.v1.get_variable("bias", [2048])
    return tf.nn.softplus(score), score, code, tf.matmul(pooled, kernel) + bias


def randomize(session, seed):
    """Random values for every variable: the slim backbone by make_delf_v1's rules, the Keras-named
    heads here (He-scaled kernels, small biases)."""
    randomize_slim_names(session, seed)
    rng = np.random.default_rng(seed + 1)
    for variable in tf.compat.v1.global_variables():
        shape = variable.shape.as_list()
        name = variable.op.name
        if name.endswith("/kernel"):
            value = rng.normal(0.0, np.sqrt(2.0 / int(np.prod(shape[:-1]))), shape)
        elif name.endswith("/bias"):
            value = rng.normal(0.0, 0.2, shape)
        else:
            continue
        variable.load(value.astype(np.float32), session)


def spread_attention(session, score, feed):
    """Rescale the last attention conv so that its scores on this image have mean 0 and std 2:
    softplus then spans about (0.01, 4), where every digit of the attention counts."""
    kernel, bias = (tf.compat.v1.global_variables(f"attention/attn_conv2/{name}")[0] for name in ("kernel", "bias"))
    values = session.run(score, feed)
    gain = 2.0 / values.std()
    kernel.load(session.run(kernel) * gain, session)
    bias.load(((session.run(bias) - values.mean()) * gain).astype(np.float32), session)


def make_model(out_dir, image_path, scales, depth, release):
    image = np.load(image_path)
    height, width = image.shape[:2]
    graph_input = tf.compat.v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
    normalized = (tf.cast(graph_input, tf.float32) - 128.0) / 128.0
    outputs, scores = [], []
    for scale in scales:
        size = tf.cast(tf.round(tf.constant([height, width], tf.float32) * scale), tf.int32)
        resized = tf.compat.v1.image.resize_bilinear(normalized[None], size)  # legacy sampling
        prob, score, code, global_raw = delg_network(resized, depth)
        outputs.append((resized, prob, code, global_raw))
        scores.append(score)
    rows = tf.concat([global_raw for *_, global_raw in outputs], axis=0)
    combined = tf.nn.l2_normalize(tf.reduce_sum(tf.nn.l2_normalize(rows, axis=1), axis=0), axis=0)
    tf.compat.v1.train.get_or_create_global_step()  # as in a training checkpoint: the import must skip it
    with tf.compat.v1.Session() as session:
        session.run(tf.compat.v1.global_variables_initializer())
        randomize(session, seed=21 + depth)
        spread_attention(session, scores[0], {graph_input: image})
        builder = tf.compat.v1.saved_model.Builder(f"{out_dir}/{release}")
        builder.add_meta_graph_and_variables(session, ["serve"])
        builder.save()
        values, final = session.run([outputs, combined], {graph_input: image})
    for index, (resized, prob, code, global_raw) in enumerate(values):
        np.savez(f"{out_dir}/reference_{index}.npz", resized=resized[0], attention=prob[0, :, :, 0],
                 local=code[0], global_raw=global_raw[0])
    np.save(f"{out_dir}/global.npy", final)


if __name__ == "__main__":
    out, image_file, scale_list, depth_text, release_name = sys.argv[1:]
    make_model(out, image_file, [float(s) for s in scale_list.split(",")], int(depth_text), release_name)
