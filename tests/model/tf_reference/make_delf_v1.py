"""Reference outputs from TensorFlow itself, for tests/model/test_tf_delf_import.py.

Runs in the test-only TensorFlow venv (scripts/setup_tf_env.sh), never in the project's own
environment. Two commands:

  make_delf_v1.py model OUT_DIR IMAGE.npy NETWORK_SCALES RESIZE_SCALES   (comma-separated lists)
      builds the TF1 graph of delf_v1.py (tf-slim resnet_v1_50 to block3 + the attention block,
      in the scopes of the released model) with seeded random weights and random BatchNorm
      statistics, saves it as a SavedModel in the release tarball's layout
      (OUT_DIR/delf_v1/model/{saved_model.pb, variables/}), and runs it on the uint8 image the
      way the TF1 extractor does: normalise (x - 128) / 128, tf.image.resize_bilinear (legacy
      sampling) to round(H * s) x round(W * s), network. Writes OUT_DIR/reference_<i>.npz with
      the resized input, attention probabilities and block3 features of every network scale, and
      OUT_DIR/resized_<i>.npy, the resized input alone, of every resize scale.

  make_delf_v1.py read CHECKPOINT_PREFIX OUT.npz
      every variable of a checkpoint as TensorFlow's own reader sees it.
"""

import sys

import numpy as np
import tensorflow as tf
import tf_keras.src.legacy_tf_layers as legacy_tf_layers

# TF 2.17 looks for tf-slim's non-fused BatchNorm layers under tf_keras.legacy_tf_layers, which
# tf-keras 2.17 ships as tf_keras.src.legacy_tf_layers.
sys.modules.setdefault("tf_keras.legacy_tf_layers", legacy_tf_layers)

import tf_slim  # noqa: E402
from tf_slim.nets import resnet_utils, resnet_v1  # noqa: E402

tf.compat.v1.disable_eager_execution()


def delf_v1_network(images):
    """(attention_prob, block3 features, attention score) as delf_v1.py's GetAttentionPrelogit builds them."""
    block = resnet_v1.resnet_v1_block
    blocks = [
        block("block1", base_depth=64, num_units=3, stride=2),
        block("block2", base_depth=128, num_units=4, stride=2),
        block("block3", base_depth=256, num_units=6, stride=2),
    ]
    reuse = tf.compat.v1.AUTO_REUSE
    with tf_slim.arg_scope(resnet_utils.resnet_arg_scope()):
        _, end_points = resnet_v1.resnet_v1(images, blocks, is_training=False, global_pool=False,
                                            reuse=reuse, scope="resnet_v1_50")
    features = end_points["resnet_v1_50/block3"]
    with (tf_slim.arg_scope(resnet_utils.resnet_arg_scope()),
          tf_slim.arg_scope([tf_slim.batch_norm], is_training=False),
          tf.compat.v1.variable_scope("attention_block", reuse=reuse),
          tf.compat.v1.variable_scope("attention")):
        with tf.compat.v1.variable_scope("compute"):
            conv1 = tf_slim.conv2d(features, 512, 1, rate=1, activation_fn=tf.nn.relu, scope="conv1")
            score = tf_slim.conv2d(conv1, 1, 1, rate=1, activation_fn=None, normalizer_fn=None, scope="conv2")
        prob = tf.nn.softplus(score)
    return prob, features, score


def randomize(session, seed):
    """Random weights, and BatchNorm statistics far from the identity, so every tensor matters.

    Residual branches end in a small gamma (as trained ResNets tend to), so block3 stays in a
    moderate range.
    """
    rng = np.random.default_rng(seed)
    for variable in tf.compat.v1.global_variables():
        shape = variable.shape.as_list()
        name = variable.op.name
        if name.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, shape)
        elif name.endswith(("moving_mean", "beta", "biases")):
            value = rng.normal(0.0, 0.2, shape)
        elif name.endswith(("conv3/BatchNorm/gamma", "shortcut/BatchNorm/gamma")):
            value = rng.uniform(0.1, 0.3, shape)
        elif name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("weights"):
            fan_in = int(np.prod(shape[:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        else:
            continue
        variable.load(value.astype(np.float32), session)


def spread_attention(session, score, feed):
    """Rescale the last attention conv so that its scores on this image have mean 0 and std 2:
    softplus then spans about (0.01, 4), where every digit of the attention counts."""
    scope = "attention_block/attention/compute/conv2/"
    weights, biases = (tf.compat.v1.global_variables(scope + name)[0] for name in ("weights", "biases"))
    values = session.run(score, feed)
    gain = 2.0 / values.std()
    bias = session.run(biases)
    weights.load(session.run(weights) * gain, session)
    biases.load(((bias - values.mean()) * gain).astype(np.float32), session)  # score -> gain * (score - mean)


def make_model(out_dir, image_path, scales, resize_scales):
    image = np.load(image_path)
    height, width = image.shape[:2]
    graph_input = tf.compat.v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
    normalized = (tf.cast(graph_input, tf.float32) - 128.0) / 128.0

    def resize(scale):
        size = tf.cast(tf.round(tf.constant([height, width], tf.float32) * scale), tf.int32)
        return tf.compat.v1.image.resize_bilinear(normalized[None], size)  # legacy sampling

    outputs = []
    for scale in scales:
        resized = resize(scale)
        prob, features, score = delf_v1_network(resized)
        outputs.append((resized, prob, features))
    resized_only = [resize(scale) for scale in resize_scales]
    tf.compat.v1.train.get_or_create_global_step()  # as in a training checkpoint: the import must skip it
    with tf.compat.v1.Session() as session:
        session.run(tf.compat.v1.global_variables_initializer())
        randomize(session, seed=14)
        spread_attention(session, score, {graph_input: image})
        builder = tf.compat.v1.saved_model.Builder(f"{out_dir}/delf_v1/model")
        builder.add_meta_graph_and_variables(session, ["serve"])
        builder.save()
        for index, values in enumerate(session.run(outputs, {graph_input: image})):
            resized, prob, features = values
            np.savez(f"{out_dir}/reference_{index}.npz", resized=resized[0], attention=prob[0, :, :, 0],
                     features=features[0])
        for index, resized in enumerate(session.run(resized_only, {graph_input: image})):
            np.save(f"{out_dir}/resized_{index}.npy", resized[0])


def read_checkpoint(prefix, out_path):
    reader = tf.train.load_checkpoint(prefix)
    names = sorted(reader.get_variable_to_shape_map())
    np.savez(out_path, **{name.replace("/", "|"): reader.get_tensor(name) for name in names})


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "model":
        make_model(arguments[0], arguments[1], [float(s) for s in arguments[2].split(",")],
                   [float(s) for s in arguments[3].split(",")])
    elif command == "read":
        read_checkpoint(arguments[0], arguments[1])
    else:
        raise SystemExit(f"unknown command {command!r}")
