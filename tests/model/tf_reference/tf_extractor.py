"""TF1 DELF's whole extraction, rebuilt in TensorFlow, for tests/model/test_tf_delf_extraction.py.

Runs in the test-only TensorFlow venv (scripts/setup_tf_env.sh), never in the project's own
environment:

  tf_extractor.py OUT_DIR SPEC.json

1. Builds the graph the released models hold (feature_extractor.ExtractKeypointDescriptor as the
   TF1 code runs it): feeds input_image (uint8), input_scales, input_abs_thres,
   input_max_feature_num; per scale (first scale outside, the others in a tf.while_loop) the
   normalised image is resized with tf.image.resize_bilinear (legacy sampling) to
   tf.round(float32 shape * scale), run through delf_v1.py's network (make_delf_v1.py), receptive
   boxes are computed and divided by the scale, cells with attention >= threshold kept, feature
   scales 1 / scale; then box_list_ops.non_max_suppression (tf.image.non_max_suppression) over all
   scales, at most min(max_feature_num, #boxes). Outputs boxes, features, scales, scores.
2. Gives it seeded random weights and BatchNorm statistics, spreads the attention on the first
   image, and saves it as a TF1 SavedModel in the release tarballs' layout, twice:
   OUT_DIR/delf_v1_20171026/{model,pca} and OUT_DIR/delf_gld_20190411/{model,pca}, each with a
   random PCA (mean.datum, pca_proj_mat.datum) written by protobuf in datum.proto's format.
3. Loads the SavedModel afresh, as examples/extractor.py's MakeExtractor does, adds
   DelfFeaturePostProcessing (L2, PCA with each release's pca_dim read from its .datum files,
   L2; the releases share one network, so one run serves both) and box centres, and runs every
   case of SPEC: first with every cell kept (the attention of the whole pyramid), then with a
   threshold it picks from that attention so that about `target` cells pass, in the middle of a
   wide gap between neighbouring values (so that no float error can move a cell across it);
   locations are divided by the case's scale_factors (ResizeImage, done by the test with
   Pillow, which this venv lacks).

SPEC: {"scales": [...], "max_feature_num": N, "pca_dims": {"delf_v1_20171026": 40, ...},
       "cases": [{"name", "image" (.npy uint8 HxWx3), "scale_factors" [fy, fx], "target"}]}
Writes OUT_DIR/<case>.npz (locations, scales, attention, descriptors_<release>, threshold,
cells_passing, all_attention) and OUT_DIR/level_sides.npz (TF's level sides for sides 10-8192).
"""

import json
import sys

import numpy as np
import tensorflow as tf
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from make_delf_v1 import delf_v1_network, randomize, spread_attention

RECEPTIVE_FIELD, STRIDE, PADDING, DEPTH = 291.0, 32.0, 145.0, 1024  # feature_extractor.py, resnet_v1_50/block3


def datum_message_class():
    """DatumProto of delf/protos/datum.proto, built from its descriptor (no protoc here)."""
    proto = descriptor_pb2.FileDescriptorProto(name="delf/protos/datum.proto", package="delf.protos",
                                               syntax="proto2")
    field = descriptor_pb2.FieldDescriptorProto
    for name, value_type in (("DatumShape", field.TYPE_INT64), ("FloatList", field.TYPE_FLOAT)):
        message = proto.message_type.add(name=name)
        values = message.field.add(name="dim" if name == "DatumShape" else "value", number=1,
                                   type=value_type, label=field.LABEL_REPEATED)
        values.options.packed = True
    datum = proto.message_type.add(name="DatumProto")
    datum.oneof_decl.add(name="kind_oneof")
    datum.field.add(name="shape", number=1, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
                    type_name=".delf.protos.DatumShape")
    datum.field.add(name="float_list", number=2, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
                    type_name=".delf.protos.FloatList", oneof_index=0)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("delf.protos.DatumProto"))


DATUM = datum_message_class()


def write_datum(path, array):
    datum = DATUM()
    datum.shape.dim.extend(array.shape)
    datum.float_list.value.extend(array.astype(np.float32).ravel())
    with open(path, "wb") as file:
        file.write(datum.SerializeToString())


def read_datum(path):
    datum = DATUM()
    with open(path, "rb") as file:
        datum.ParseFromString(file.read())
    return np.array(datum.float_list.value, dtype=np.float32).reshape(list(datum.shape.dim))


def receptive_boxes(height, width):
    """CalculateReceptiveBoxes: [ymin, xmin, ymax, xmax] of every cell, row-major over (y, x)."""
    x, y = tf.meshgrid(tf.range(width), tf.range(height))
    coordinates = tf.reshape(tf.stack([y, x], axis=2), [-1, 2])
    point_boxes = tf.cast(tf.concat([coordinates, coordinates], 1), tf.float32)
    bias = [-PADDING, -PADDING, -PADDING + RECEPTIVE_FIELD - 1, -PADDING + RECEPTIVE_FIELD - 1]
    return STRIDE * point_boxes + bias


def build_extraction_graph():
    """The release graph's feeds and outputs (ExtractKeypointDescriptor); returns the attention score
    map at scale 1 too, for spread_attention."""
    image = tf.compat.v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
    image_scales = tf.compat.v1.placeholder(tf.float32, [None], name="input_scales")
    abs_thres = tf.compat.v1.placeholder(tf.float32, [], name="input_abs_thres")
    max_feature_num = tf.compat.v1.placeholder(tf.int32, [], name="input_max_feature_num")
    original_shape = tf.gather(tf.cast(tf.shape(image), tf.float32), [0, 1])
    normalized = tf.expand_dims((tf.cast(image, tf.float32) - 128.0) / 128.0, 0)

    def process_scale(index, boxes, features, scales, scores):
        scale = tf.gather(image_scales, index)
        new_size = tf.cast(tf.round(original_shape * scale), tf.int32)
        resized = tf.compat.v1.image.resize_bilinear(normalized, new_size)
        attention, feature_map, _ = delf_v1_network(resized)
        rf_boxes = receptive_boxes(tf.shape(feature_map)[1], tf.shape(feature_map)[2])
        rf_boxes = tf.divide(rf_boxes, scale)  # back to the image's pixels, by the nominal scale
        attention = tf.reshape(attention, [-1])
        feature_map = tf.reshape(feature_map, [-1, DEPTH])
        indices = tf.reshape(tf.where(attention >= abs_thres), [-1])
        selected_scores = tf.gather(attention, indices)
        return (index + 1,
                tf.concat([boxes, tf.gather(rf_boxes, indices)], 0),
                tf.concat([features, tf.gather(feature_map, indices)], 0),
                tf.concat([scales, tf.ones_like(selected_scores, tf.float32) / scale], 0),
                tf.concat([scores, selected_scores], 0))

    empty = (tf.zeros([0, 4]), tf.zeros([0, DEPTH]), tf.zeros([0]), tf.zeros([0]))
    first = list(process_scale(tf.constant(0), *empty))  # creates the variables; the loop reuses them
    _, boxes, features, scales, scores = tf.compat.v1.while_loop(
        lambda index, *_: tf.less(index, tf.shape(image_scales)[0]), process_scale, first,
        shape_invariants=[tf.TensorShape([]), tf.TensorShape([None, 4]), tf.TensorShape([None, DEPTH]),
                          tf.TensorShape([None]), tf.TensorShape([None])],
        back_prop=False)
    max_boxes = tf.minimum(max_feature_num, tf.shape(boxes)[0])
    keep = tf.image.non_max_suppression(boxes, scores, max_boxes, iou_threshold=1.0)  # box_list_ops
    tf.identity(tf.gather(boxes, keep), name="boxes")
    tf.identity(tf.gather(features, keep), name="features")
    tf.identity(tf.gather(scales, keep), name="scales")
    tf.identity(tf.expand_dims(tf.gather(scores, keep), 1), name="scores")
    _, _, score_at_scale_one = delf_v1_network(normalized)
    return image, score_at_scale_one


def save_releases(out_dir, releases, first_image):
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session() as session:
        image, score = build_extraction_graph()
        session.run(tf.compat.v1.global_variables_initializer())
        randomize(session, seed=19)
        spread_attention(session, score, {image: first_image})
        rng = np.random.default_rng(19)
        for release in releases:
            builder = tf.compat.v1.saved_model.Builder(f"{out_dir}/{release}/model")
            builder.add_meta_graph_and_variables(session, ["serve"])
            builder.save()
            tf.io.gfile.makedirs(f"{out_dir}/{release}/pca")
            write_datum(f"{out_dir}/{release}/pca/mean.datum", rng.normal(0.0, 0.02, DEPTH))
            write_datum(f"{out_dir}/{release}/pca/pca_proj_mat.datum",
                        np.linalg.qr(rng.normal(size=(DEPTH, DEPTH)))[0])


def make_extractor(session, model_dir, pca):
    """examples/extractor.py MakeExtractor + feature_extractor.DelfFeaturePostProcessing, for each
    {name: (pca_dir, pca_dim)} of `pca` on the same network outputs."""
    tf.compat.v1.saved_model.loader.load(session, ["serve"], model_dir)
    graph = session.graph
    feeds = [graph.get_tensor_by_name(f"{name}:0") for name in
             ("input_image", "input_abs_thres", "input_scales", "input_max_feature_num")]
    boxes, raw_descriptors, feature_scales, scores = (
        graph.get_tensor_by_name(f"{name}:0") for name in ("boxes", "features", "scales", "scores"))
    outputs = {
        "locations": tf.divide(tf.add(tf.gather(boxes, [0, 1], axis=1), tf.gather(boxes, [2, 3], axis=1)), 2.0),
        "scales": feature_scales,
        "attention": tf.reshape(scores, [tf.shape(scores)[0]]),
    }
    normalized = tf.nn.l2_normalize(raw_descriptors, axis=1)
    for name, (pca_dir, pca_dim) in pca.items():
        pca_mean = tf.constant(read_datum(f"{pca_dir}/mean.datum"))
        pca_matrix = tf.constant(read_datum(f"{pca_dir}/pca_proj_mat.datum"))
        projected = tf.matmul(tf.subtract(normalized, pca_mean), tf.slice(pca_matrix, [0, 0], [pca_dim, -1]),
                              transpose_b=True)
        outputs[f"descriptors_{name}"] = tf.nn.l2_normalize(projected, axis=1)

    def extract(image, scale_factors, threshold, scales, max_feature_num):
        values = session.run(outputs, dict(zip(feeds, (image, threshold, scales, max_feature_num), strict=True)))
        # ExtractorFn: locations_out / scale_factors (float64); feature_io stores float32.
        values["locations"] = (values["locations"] / np.asarray(scale_factors, dtype=float)).astype(np.float32)
        return values

    return extract


def pick_threshold(all_attention, target):
    """A float32 threshold passed by about `target` cells, midway in the widest gap near that rank."""
    values = np.sort(all_attention)[::-1]
    window = np.arange(max(1, target - 40), min(len(values) - 1, target + 40))
    gaps = values[window - 1] - values[window]
    rank = window[np.argmax(gaps)]  # values[:rank] pass
    return np.float32((values[rank - 1] + values[rank]) / 2), int(rank)


def main(out_dir, spec_path):
    with open(spec_path) as file:
        spec = json.load(file)
    images = [np.load(case["image"]) for case in spec["cases"]]
    releases = spec["pca_dims"]
    save_releases(out_dir, list(releases), images[0])
    first = next(iter(releases))  # the releases hold the same network: one run serves every PCA
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        extract = make_extractor(session, f"{out_dir}/{first}/model",
                                 {name: (f"{out_dir}/{name}/pca", dim) for name, dim in releases.items()})
        for case, image in zip(spec["cases"], images, strict=True):
            every_cell = extract(image, case["scale_factors"], -1.0, spec["scales"], 10**9)["attention"]
            threshold, passing = pick_threshold(every_cell, case["target"])
            values = extract(image, case["scale_factors"], threshold, spec["scales"], spec["max_feature_num"])
            np.savez(f"{out_dir}/{case['name']}.npz", threshold=threshold, cells_passing=passing,
                     all_attention=every_cell, **values)
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        sides = tf.constant(np.arange(10, 8193, dtype=np.float32))
        level_sides = [tf.cast(tf.round(sides * tf.constant(scale, tf.float32)), tf.int32)
                       for scale in spec["scales"]]
        np.savez(f"{out_dir}/level_sides.npz", sides=np.arange(10, 8193), level_sides=session.run(level_sides))


if __name__ == "__main__":
    main(*sys.argv[1:])
