"""A prepared TFDS data set in the array_record format, written without TensorFlow: ``tf.train.Example`` is
built from its .proto definition with the protobuf library (the reference encoder the reader is tested against),
and the folder holds what ``tfds`` writes (dataset_info.json, features.json, label.labels.txt, shards)."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


def example_class():
    """tensorflow/core/example/{example,feature}.proto's Example, as a protobuf message class."""
    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="tfds_test_example.proto", package="tfds_test", syntax="proto3")

    def message(name, *fields, nested=()):
        m = fd.message_type.add(name=name) if not nested else nested[0].nested_type.add(name=name)
        for number, fname, ftype, label, type_name, packed in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
            if packed:
                f.options.packed = True
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", (1, "value", F.TYPE_BYTES, rep, None, False))
    message("FloatList", (1, "value", F.TYPE_FLOAT, rep, None, True))
    message("Int64List", (1, "value", F.TYPE_INT64, rep, None, True))
    feature = message("Feature", (1, "bytes_list", F.TYPE_MESSAGE, opt, ".tfds_test.BytesList", False),
                      (2, "float_list", F.TYPE_MESSAGE, opt, ".tfds_test.FloatList", False),
                      (3, "int64_list", F.TYPE_MESSAGE, opt, ".tfds_test.Int64List", False))
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    features = message("Features", (1, "feature", F.TYPE_MESSAGE, rep, ".tfds_test.Features.FeatureEntry", False))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".tfds_test.Feature")
    message("Example", (1, "features", F.TYPE_MESSAGE, opt, ".tfds_test.Features", False))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tfds_test.Example"))


def serialize(Example, image: bytes, label: int, extra_float: float = 0.5) -> bytes:
    ex = Example()
    ex.features.feature["image"].bytes_list.value.append(image)
    ex.features.feature["label"].int64_list.value.append(label)
    ex.features.feature["score"].float_list.value.append(extra_float)  # a float feature the reader skips
    return ex.SerializeToString()


def write_tfds(root, name: str, splits: dict, classes, shards: int = 2) -> Path:
    """``splits``: {tfds split name: [(encoded image, label), ...]}. Returns the version folder."""
    from array_record.python.array_record_module import ArrayRecordWriter

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    Example = example_class()
    info_splits = []
    for split, examples in splits.items():
        per = [examples[i::shards] for i in range(shards)]  # any split of records into shards will do
        lengths = []
        for i, part in enumerate(per):
            writer = ArrayRecordWriter(str(root / f"{name}-{split}.array_record-{i:05d}-of-{shards:05d}"),
                                       "group_size:1")
            for image, label in part:
                writer.write(serialize(Example, image, label))
            writer.close()
            lengths.append(str(len(part)))
        info_splits.append({"name": split, "numBytes": "0", "shardLengths": lengths,
                            "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"})
    (root / "dataset_info.json").write_text(json.dumps(
        {"name": name, "fileFormat": "array_record", "splits": info_splits, "version": "1.0.0"}))
    (root / "features.json").write_text(json.dumps({"featuresDict": {"features": {
        "image": {"pythonClassName": "tensorflow_datasets.core.features.image_feature.Image"},
        "label": {"pythonClassName": "tensorflow_datasets.core.features.class_label_feature.ClassLabel",
                  "classLabel": {"numClasses": str(len(classes))}}}}}))
    (root / "label.labels.txt").write_text("\n".join(classes) + "\n")
    return root
