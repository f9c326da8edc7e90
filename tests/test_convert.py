"""``fastgpu-jax convert``: image folders, CIFAR-10 and MNIST to ArrayRecord shards that read back exactly."""

import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from fastgpu_jax import cli, data
from fastgpu_jax.data import image_sources
from fastgpu_jax.data.convert import CIFAR10_CLASSES, convert, verify
from fastgpu_jax.data.images import BadImageError
from image_folders import write_image_folder
from test_data import CIFAR_PER_FILE, cifar_record_bytes, make_idx_arrays, write_idx_dir


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def check_manifest_files(out, manifest):
    """Every shard on disk has the manifest's size and an independently computed SHA-256; nothing else there."""
    listed = []
    for split, entry in manifest["splits"].items():
        assert sum(s["count"] for s in entry["shards"]) == entry["count"]
        n = len(entry["shards"])
        for i, shard in enumerate(entry["shards"]):
            assert shard["file"] == f"{split}-{i:05d}-of-{n:05d}.array_record"
            assert os.path.getsize(out / shard["file"]) == shard["bytes"]
            assert sha256(out / shard["file"]) == shard["sha256"]
            listed.append(shard["file"])
    assert sorted(os.listdir(out)) == sorted(listed + ["manifest.json"])
    assert json.loads((out / "manifest.json").read_text()) == manifest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"), counts={"train": 6, "val": 2})


# --------------------------------------------------------------------------- folders


def test_folder_converts_verbatim_and_reads_back(folder, tmp_path):
    out = tmp_path / "ar"
    manifest = convert("folder", folder, out, shard_size=7, progress=False)
    assert manifest["format"] == image_sources.MANIFEST_FORMAT
    assert manifest["classes"] == list(image_sources.folder_classes(folder)) == ["blue", "green", "red"]
    assert manifest["source"] == {"from": "folder", "resize_short": None, "quality": None}
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 18, "val": 6}
    assert [len(e["shards"]) for e in manifest["splits"].values()] == [3, 1]  # 7 + 7 + 4, then 6
    check_manifest_files(out, manifest)
    for split in ("train", "val"):
        src, ar = image_sources.folder_split(folder, split), image_sources.ArrayRecordSplit(out, split)
        assert len(ar) == len(src) and ar.classes == src.classes
        for i in range(len(src)):
            data_src, label_src, _ = src[i]
            assert ar[i] == (data_src, label_src, src.name(i))  # the very bytes, label, relative name
    # mean/std: every train pixel (18 < 10,000 examples), RGB, pixel units
    px = [np.asarray(Image.open(folder / image_sources.folder_split(folder, "train").name(i)).convert("RGB"))
          .reshape(-1, 3).astype(np.float64) for i in range(18)]
    px = np.concatenate(px)
    np.testing.assert_allclose(manifest["mean"], px.mean(0), rtol=1e-9)
    np.testing.assert_allclose(manifest["std"], px.std(0), rtol=1e-9)
    assert image_sources.classes_and_stats("arrayrecord", out)[1] == tuple(manifest["mean"])

    verify(out)
    shard = out / manifest["splits"]["train"]["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train-00001-of-00003\.array_record.*SHA-256"):
        verify(out)
    shard.write_bytes(bytes(raw[:-1]))
    with pytest.raises(ValueError, match=r"train-00001-of-00003\.array_record.*bytes"):
        verify(out)


def test_arrayrecord_batches_equal_the_folders_batches(folder, tmp_path):
    """A converted set is the same data set: same seed, same train and eval batches, whichever the source."""
    out = tmp_path / "ar"
    convert("folder", folder, out, shard_size=5, progress=False)
    opts = data.image_pipeline.ImageOptions(size=12, augment=True)
    kw = dict(batch_size=8, seed=4, image_options=opts)
    a = data.train_iterator("folder", data_dir=folder, **kw)
    b = data.train_iterator("arrayrecord", data_dir=out, workers=2, **kw)
    for _ in range(5):  # 40 examples: past the end of the first epoch
        x, y = next(a), next(b)
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    b.close()
    ev = [list(data.eval_batches(name, "val", batch_size=4, data_dir=d, image_options=opts))
          for name, d in (("folder", folder), ("arrayrecord", out))]
    assert len(ev[0]) == len(ev[1]) == 2
    for x, y in zip(*ev):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(x[key], y[key])


def test_same_input_same_output(folder, tmp_path):
    a = convert("folder", folder, tmp_path / "a", progress=False, workers=1)
    b = convert("folder", folder, tmp_path / "b", progress=False, workers=3)
    assert a == b


def test_resize_short_stores_jpegs_with_that_short_side(tmp_path):
    src = write_image_folder(tmp_path / "imgs", counts={"train": 4, "val": 1},
                             sizes=((90, 60), (60, 90), (70, 70), (24, 30)))
    out = tmp_path / "ar"
    manifest = convert("folder", src, out, resize_short=32, quality=85, progress=False)
    assert manifest["source"] == {"from": "folder", "resize_short": 32, "quality": 85}
    check_manifest_files(out, manifest)
    resized = 0
    for split in ("train", "val"):
        folder_split, ar = image_sources.folder_split(src, split), image_sources.ArrayRecordSplit(out, split)
        for i in range(len(ar)):
            stored, label, name = ar[i]
            assert (label, name) == (folder_split[i][1], folder_split.name(i))
            w0, h0 = Image.open(io.BytesIO(folder_split[i][0])).size
            im = Image.open(io.BytesIO(stored))
            if min(w0, h0) > 32:
                resized += 1
                assert im.format == "JPEG" and min(im.size) == 32
                assert abs(max(im.size) / 32 - max(w0, h0) / min(w0, h0)) < 0.05  # aspect ratio kept
            else:
                assert im.size == (w0, h0)  # never enlarged
    assert resized > 10


def test_bad_image_aborts_without_manifest(tmp_path):
    src = write_image_folder(tmp_path / "imgs", counts={"train": 3})
    bad = src / "train" / "green" / "000.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    for kw in ({}, {"resize_short": 16}):
        out = tmp_path / f"ar{len(kw)}"
        with pytest.raises(BadImageError, match=r"green/000\.png") as err:
            convert("folder", src, out, progress=False, **kw)
        assert "\n" not in str(err.value)
        assert os.listdir(out) == []  # no manifest, no half-written shards


# --------------------------------------------------------------------------- arrays


def test_cifar10_pngs_equal_the_arrays(tmp_path):
    d = tmp_path / "cifar" / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(5):
        x = rng.integers(0, 256, (CIFAR_PER_FILE, 32, 32, 3), dtype=np.uint8)
        (d / f"data_batch_{i + 1}.bin").write_bytes(cifar_record_bytes(x, rng.integers(0, 10, CIFAR_PER_FILE)))
    (d / "test_batch.bin").write_bytes(cifar_record_bytes(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
                                                          rng.integers(0, 10, 4)))
    out = tmp_path / "ar"
    manifest = convert("cifar10", tmp_path / "cifar", out, progress=False)
    assert manifest["classes"] == list(CIFAR10_CLASSES) and len(CIFAR10_CLASSES) == 10
    assert manifest["source"] == {"from": "cifar10", "resize_short": None, "quality": None}
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 10, "val": 5000, "test": 4}
    check_manifest_files(out, manifest)
    for split in ("train", "val", "test"):
        x, y = data.sources.split_arrays("cifar10", split, tmp_path / "cifar")
        ar = image_sources.ArrayRecordSplit(out, split)
        for i in list(range(min(len(y), 20))) + [len(y) - 1]:
            stored, label, name = ar[i]
            assert (label, name) == (y[i], f"{split}/{i:06d}.png")
            im = Image.open(io.BytesIO(stored))
            assert im.format == "PNG"
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), x[i])
    train = data.sources.split_arrays("cifar10", "train", tmp_path / "cifar")[0].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(manifest["mean"], train.mean(0), rtol=1e-9)
    np.testing.assert_allclose(manifest["std"], train.std(0), rtol=1e-9)


def test_mnist_gray_pngs_equal_the_arrays(tmp_path):
    arrays = make_idx_arrays()
    write_idx_dir(tmp_path / "mnist", arrays)
    out = tmp_path / "ar"
    manifest = convert("mnist", tmp_path / "mnist", out, shard_size=2000, progress=False)
    assert manifest["classes"] == [str(d) for d in range(10)]
    counts = {s: e["count"] for s, e in manifest["splits"].items()}
    assert counts == {"train": 12, "val": 5000, "test": 7}
    assert [s["file"] for s in manifest["splits"]["val"]["shards"]] == [
        f"val-{i:05d}-of-00003.array_record" for i in range(3)]
    check_manifest_files(out, manifest)
    for split in ("train", "val", "test"):
        x, y = data.sources.split_arrays("mnist", split, tmp_path / "mnist")
        ar = image_sources.ArrayRecordSplit(out, split)
        for i in [0, 1, 2, len(y) - 2, len(y) - 1] + ([2000, 1999, 4000] if split == "val" else []):
            stored, label, name = ar[i]
            assert (label, name) == (y[i], f"{split}/{i:06d}.png")
            im = Image.open(io.BytesIO(stored))
            assert im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), x[i, :, :, 0])
    train = arrays["train-images-idx3-ubyte"][:12].astype(np.float64)
    assert manifest["mean"] == pytest.approx([train.mean()] * 3, rel=1e-9)
    assert manifest["std"] == pytest.approx([train.std()] * 3, rel=1e-9)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kw, match", [
    ({"kind": "imagenet"}, r"unknown source kind 'imagenet'.*folder, hf, cifar10, mnist"),
    ({"resize_short": 0}, r"resize_short must be a positive integer.*got 0"),
    ({"resize_short": -3}, r"resize_short.*got -3"),
    ({"quality": 0}, r"quality must be an integer JPEG quality in 1\.\.100 \(got 0\)"),
    ({"quality": 101}, r"quality.*1\.\.100 \(got 101\)"),
    ({"shard_size": 0}, r"shard_size must be a positive integer.*got 0"),
])
def test_bad_arguments_are_refused(folder, tmp_path, kw, match):
    args = {"kind": "folder", **kw}
    kind = args.pop("kind")
    with pytest.raises(ValueError, match=match) as err:
        convert(kind, folder, tmp_path / "ar", progress=False, **args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ar").exists()


def test_missing_input_is_refused(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"input '{missing}' is not a directory; expected an image folder"):
        convert("folder", missing, tmp_path / "ar", progress=False)
    with pytest.raises(FileNotFoundError, match=r"nowhere.*the mnist files"):
        convert("mnist", missing, tmp_path / "ar", progress=False)
    assert not (tmp_path / "ar").exists()


def test_existing_data_set_is_never_overwritten_silently(folder, tmp_path):
    out = tmp_path / "ar"
    first = convert("folder", folder, out, progress=False)
    before = {f: sha256(out / f) for f in os.listdir(out)}
    with pytest.raises(FileExistsError, match=rf"output '{out}' already holds a data set \(manifest\.json"):
        convert("folder", folder, out, progress=False)
    (out / "manifest.json").unlink()  # shards alone (an interrupted run) are refused too
    with pytest.raises(FileExistsError, match=r"already holds a data set \(train-00000-of-00001\.array_record"):
        convert("folder", folder, out, progress=False)
    assert convert("folder", folder, out, progress=False, overwrite=True) == first
    assert {f: sha256(out / f) for f in os.listdir(out)} == before


# --------------------------------------------------------------------------- command line


def test_cli_convert_and_verify(folder, tmp_path, capsys):
    out = tmp_path / "ar"
    rc = cli.main(["convert", "--from", "folder", "--input", str(folder), "--output", str(out), "--shard-size", "5"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"output": str(out), "from": "folder", "counts": {"train": 18, "val": 6}, "classes": 3,
                       "verified": False}
    assert cli.main(["convert", "--verify", "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["verified"] is True

    rc = cli.main(["convert", "--from", "folder", "--input", str(folder), "--output", str(tmp_path / "q"),
                   "--resize-short", "32", "--quality", "101"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgpu-jax: error: ") and "quality" in err and err.count("\n") == 1
    assert cli.main(["convert", "--from", "folder", "--input", str(folder), "--output", str(out)]) == 2
    assert "already holds a data set" in capsys.readouterr().err
    assert cli.main(["convert", "--output", str(out)]) == 2  # neither --from/--input nor --verify


# --------------------------------------------------------------------------- Hugging Face sets on disk


HF_CLASSES = ["cat", "dog", "fox"]


def _hf_table(pa, n: int, seed: int, labels=None):
    """A table as ``datasets`` writes it: an Image feature (struct of bytes + path) and a ClassLabel."""
    from image_folders import COLOURS, draw, encode

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n) if labels is None else np.asarray(labels)
    blobs = [encode(draw(rng, list(COLOURS.values())[int(k) % 3], (20 + i % 7, 16)), ("jpg", "png")[i % 2])
             for i, k in enumerate(labels)]
    features = {"image": {"_type": "Image"}, "label": {"names": HF_CLASSES, "_type": "ClassLabel"}}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in blobs], image_type),
                      "label": pa.array(labels, pa.int64())})
    return table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})}), blobs


def _check_hf_output(out, expect: dict):
    for split, (blobs, labels) in expect.items():
        ar = image_sources.ArrayRecordSplit(out, split)
        assert len(ar) == len(blobs) and list(ar.classes) == HF_CLASSES
        for i, (blob, label) in enumerate(zip(blobs, labels)):
            assert ar[i] == (blob, int(label), f"{split}/{i:08d}")


def test_hf_parquet_files_convert_with_their_class_names(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "hub" / "data"
    src.mkdir(parents=True)
    expect = {"train": ([], []), "val": ([], [])}
    for name, split, n, seed in (("train-00000-of-00002", "train", 7, 0), ("train-00001-of-00002", "train", 6, 1),
                                 ("validation-00000-of-00001", "val", 5, 2)):
        table, blobs = _hf_table(pa, n, seed)
        pq.write_table(table, src / f"{name}.parquet", row_group_size=3)  # several row groups a file
        expect[split][0].extend(blobs)
        expect[split][1].extend(table.column("label").to_pylist())
    table, _ = _hf_table(pa, 4, 3, labels=[-1] * 4)  # an unlabelled test split, as on the Hub
    pq.write_table(table, src / "test-00000-of-00001.parquet")
    with pytest.warns(UserWarning, match="the test split has no labels"):
        manifest = convert("hf", tmp_path / "hub", tmp_path / "ar", shard_size=4, progress=False, workers=2)
    assert manifest["classes"] == HF_CLASSES and {s: e["count"] for s, e in manifest["splits"].items()} == \
        {"train": 13, "val": 5}
    check_manifest_files(tmp_path / "ar", manifest)
    _check_hf_output(tmp_path / "ar", expect)


def test_hf_save_to_disk_folders_convert(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc  # noqa: F401 (loads pa.ipc)

    expect = {}
    for folder, split, n in (("train", "train", 9), ("test", "test", 4)):
        table, blobs = _hf_table(pa, n, n)
        d = tmp_path / "saved" / folder
        d.mkdir(parents=True)
        features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        table = table.replace_schema_metadata(None)  # the classes must then come from dataset_info.json
        (d / "dataset_info.json").write_text(json.dumps({"features": features}))
        with pa.ipc.new_stream(str(d / "data-00000-of-00001.arrow"), table.schema) as writer:
            writer.write_table(table, max_chunksize=4)
        expect[split] = (blobs, table.column("label").to_pylist())
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    manifest = convert("hf", tmp_path / "saved", tmp_path / "ar", progress=False)
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 9, "test": 4}
    _check_hf_output(tmp_path / "ar", expect)


def test_hf_sets_without_an_image_column_or_a_train_split_are_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a").mkdir()
    pq.write_table(pa.table({"text": ["x"], "label": [0]}), tmp_path / "a" / "train-0.parquet")
    with pytest.raises(ValueError, match=r"train-0.parquet: no image column .*\['text', 'label'\].*--image-column"):
        convert("hf", tmp_path / "a", tmp_path / "out", progress=False)
    (tmp_path / "b").mkdir()
    table, _ = _hf_table(pa, 2, 0)
    pq.write_table(table, tmp_path / "b" / "test-0.parquet")
    with pytest.raises(ValueError, match="holds no train split"):
        convert("hf", tmp_path / "b", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="label column 'fine' not found"):
        convert("hf", tmp_path / "b", tmp_path / "out", progress=False, label_column="fine")
    assert not (tmp_path / "out").exists()  # nothing written


def test_hf_sets_whose_train_split_has_no_labels_are_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table, _ = _hf_table(pa, 3, 0, labels=[-1] * 3)
    pq.write_table(table, tmp_path / "train-0.parquet")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="the train split has no labelled examples"):
        convert("hf", tmp_path, tmp_path / "out", progress=False)
    text = pa.table({"image": table.column("image"), "label": ["cat", "dog", "fox"]})
    pq.write_table(text, tmp_path / "train-0.parquet")
    with pytest.raises(ValueError, match="label column 'label' does not hold integers"):
        convert("hf", tmp_path, tmp_path / "out", progress=False)
