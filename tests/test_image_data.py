"""Image folders and ArrayRecord sets: decoding against Pillow, the Inception crop's law, batches that do not
depend on worker or process counts, the bad-data policy, and a folder run from training to prediction."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import fastgpu_jax as fg
from fastgpu_jax import data
from fastgpu_jax.data import image_pipeline, image_sources, images
from fastgpu_jax.writers import TIMING_KEYS, read_metrics
from conftest import DIGITS, ROOT, run_cli
from image_folders import draw, encode, write_image_folder

SIZE = 16  # crops the tests' models see


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("photos"), counts={"train": 20, "val": 6})


def _jpeg(w=120, h=90, seed=0, **save):
    buf = io.BytesIO()
    Image.fromarray(draw(np.random.default_rng(seed), (120, 80, 200), (w, h))).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _take(it, n):
    out = [next(it) for _ in range(n)]
    getattr(it, "close", lambda: None)()
    return out


# --------------------------------------------------------------------------- decode and transforms


def test_eval_transform_is_pillows_resize_of_the_center_box():
    raw = _jpeg()
    ref = Image.open(io.BytesIO(raw)).convert("RGB")
    side = 0.875 * 90
    box = ((120 - side) / 2, (90 - side) / 2, (120 + side) / 2, (90 + side) / 2)
    want = np.asarray(ref.resize((SIZE * 4, SIZE * 4), Image.BILINEAR, box=box))
    np.testing.assert_array_equal(images.eval_transform(raw, "x.jpg", size=SIZE * 4), want)


def test_reduced_dct_decoding_is_close_to_the_full_decode():
    """A 1/2-1/8 scale JPEG decode for a small target: within a few levels of resampling the full image."""
    raw = _jpeg(800, 600, seed=1)
    full = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB").resize((64, 64), Image.BILINEAR,
                                                                        box=(100, 0, 700, 600)))
    im, factor = images.decode(raw, "x.jpg", min_size=(86, 64))
    assert factor == 8  # 600 / 8 = 75 >= 64 rows
    got = images.eval_transform(raw, "x.jpg", size=64, crop=1.0)
    assert np.abs(got.astype(int) - full).mean() < 4


@pytest.mark.parametrize("w, h", [(300, 200), (301, 201), (250, 97)])  # odd sizes: the scales' rounding
def test_simplejpeg_and_pillow_give_the_same_pixels(monkeypatch, w, h):
    raw = _jpeg(w, h, seed=2)
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    sizes = (12, 24, 50, 64, 150)
    fast = [images.train_transform(raw, "x.jpg", rng(), size=s) for s in sizes]
    fast += [images.eval_transform(raw, "x.jpg", size=s) for s in sizes]
    monkeypatch.setattr(images, "_simplejpeg", None)
    slow = [images.train_transform(raw, "x.jpg", rng(), size=s) for s in sizes]
    slow += [images.eval_transform(raw, "x.jpg", size=s) for s in sizes]
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)


def test_random_resized_crop_boxes_follow_the_inception_law():
    rng = np.random.default_rng(0)
    for w, h in ((500, 375), (64, 300), (1000, 40)):
        boxes = np.array([images.random_resized_crop_box(rng, w, h, min_scale=0.2, max_aspect=1.5)
                          for _ in range(500)])
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all() and (bw > 0).all() and (bh > 0).all()
        if (w, h) == (500, 375):  # no fallback on an ordinary photo: the area and aspect laws hold
            area = bw * bh / (w * h)
            assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0
            assert (bw / bh).min() >= 1 / 1.5 - 0.02 and (bw / bh).max() <= 1.5 + 0.02
            assert abs(np.median(np.log(bw / bh))) < 0.1  # log-uniform around 1
        else:  # extreme shapes end in the centered fallback at times, always of an allowed aspect or the image
            ratios = bw / bh
            assert ((ratios >= 1 / 1.5 - 0.02) & (ratios <= 1.5 + 0.02) | (bw == w) | (bh == h)).all()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_every_mode_becomes_rgb(mode):
    pixels = draw(np.random.default_rng(3), (200, 100, 50), (20, 12))
    if mode == "I;16":
        gray = (pixels[..., 0].astype(np.uint16) << 8) | 0x7F
        im, fmt = Image.fromarray(gray), "PNG"  # uint16 -> mode I;16
        want = np.repeat(pixels[..., :1], 3, axis=-1)
    else:
        im = Image.fromarray(pixels).convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        want = None
    buf = io.BytesIO()
    im.save(buf, fmt)
    got, _ = images.decode(buf.getvalue(), f"x.{fmt.lower()}")
    got = np.asarray(got)
    assert got.shape == (12, 20, 3) and got.dtype == np.uint8
    if want is None:
        want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("payload, words", [
    (lambda: _jpeg()[:600], "corrupt or truncated"),
    (lambda: b"this is a text file, not a picture", "not an image"),
    (lambda: b"", "empty file"),
])
def test_bad_images_name_the_file(payload, words):
    with pytest.raises(images.BadImageError, match=f"cat/7.jpg: .*{words}"):
        images.eval_transform(payload(), "cat/7.jpg", size=8)


def test_too_large_images_are_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 80)
    with pytest.raises(images.BadImageError, match=r"big.jpg: image of 120x90 pixels is too large"):
        images.eval_transform(_jpeg(), "big.jpg", size=8)
    png = encode(draw(np.random.default_rng(0), (1, 2, 3), (120, 90)), "png")
    with pytest.raises(images.BadImageError, match=r"big.png: image of 120x90 pixels is too large"):
        images.eval_transform(png, "big.png", size=8)


# --------------------------------------------------------------------------- the folder source


def test_folder_classes_labels_and_files(folder):
    info = data.info("folder", folder, image_size=SIZE)
    assert info.classes == ("blue", "green", "red") and info.num_classes == 3
    assert info.split_sizes == {"train": 60, "val": 18} and info.image_shape == (SIZE, SIZE, 3)
    split = image_sources.folder_split(folder, "val")
    for i in range(len(split)):
        raw, label, path = split[i]
        assert os.path.basename(os.path.dirname(path)) == info.classes[label]
        assert raw == open(path, "rb").read()


def test_missing_train_folder_lists_what_is_there(tmp_path):
    (tmp_path / "training").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"has no train/ subfolder .* it holds: notes.txt, training/"):
        data.info("folder", tmp_path, image_size=8)


def test_empty_class_folder_is_an_error_unless_skipping(tmp_path):
    root = write_image_folder(tmp_path, counts={"train": 4, "val": 2})
    (root / "train" / "zebra").mkdir()
    (root / "train" / "zebra" / "README.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder\(s\) zebra of train/ .* hold no image"):
        data.train_iterator("folder", batch_size=4, seed=0, data_dir=root)
    skip = image_pipeline.ImageOptions(size=8, on_bad_example="skip")
    batch = next(data.train_iterator("folder", batch_size=4, seed=0, data_dir=root, image_options=skip))
    assert batch["image"].shape == (4, 8, 8, 3)
    assert data.info("folder", root, image_size=8).classes == ("blue", "green", "red", "zebra")  # labels stay


def test_a_val_class_unknown_to_train_is_refused(tmp_path):
    root = write_image_folder(tmp_path, counts={"train": 2, "val": 1})
    shutil.copytree(root / "val" / "red", root / "val" / "purple")
    with pytest.raises(ValueError, match="class folder.*purple that train/ does not have"):
        list(data.eval_batches("folder", "val", batch_size=4, data_dir=root))


# --------------------------------------------------------------------------- the pipeline


def _options(**kw):
    return image_pipeline.ImageOptions(size=SIZE, **kw)


def test_batches_are_uint8_and_an_epoch_covers_every_example_once(folder):
    it = data.train_iterator("folder", batch_size=12, seed=3, data_dir=folder, image_options=_options())
    batches = _take(it, 5)  # 60 examples = 5 batches = one epoch
    assert all(b["image"].dtype == np.uint8 and b["image"].shape == (12, SIZE, SIZE, 3) for b in batches)
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(np.bincount(labels), [20, 20, 20])


def test_batches_do_not_depend_on_workers_processes_or_resumes(folder):
    kw = dict(batch_size=8, seed=1, data_dir=folder, image_options=_options())
    ref = _take(data.train_iterator("folder", **kw), 9)
    for workers in (2, 3):
        got = _take(data.train_iterator("folder", workers=workers, **kw), 9)
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    halves = [_take(data.train_iterator("folder", process_index=p, process_count=2, **kw), 9) for p in (0, 1)]
    for a, b0, b1 in zip(ref, *halves):
        np.testing.assert_array_equal(a["image"], np.concatenate([b0["image"], b1["image"]]))
    it = data.train_iterator("folder", workers=2, **kw)
    it.set_state({"next_index": 6})  # a resume
    for a, b in zip(ref[6:], _take(it, 3)):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_batches_are_the_split_in_order_with_a_mask(folder):
    opts = _options()
    batches = list(data.eval_batches("folder", "val", batch_size=8, data_dir=folder, image_options=opts))
    split = image_sources.folder_split(folder, "val")
    assert len(batches) == 3 and [b["mask"].sum() for b in batches] == [8, 8, 2]
    for i in range(len(split)):
        raw, label, path = split[i]
        b, row = batches[i // 8], i % 8
        assert b["label"][row] == label
        np.testing.assert_array_equal(b["image"][row], images.eval_transform(raw, path, size=SIZE))
    it = data.eval_batches("folder", "val", batch_size=8, data_dir=folder, image_options=opts, workers=2)
    for a, b in zip(batches, list(it), strict=True):  # decoded by two processes: the same batches
        np.testing.assert_array_equal(a["image"], b["image"])
    assert it._it is None  # the pass is over: its worker processes are stopped, not left to the collector


def _with_bad_files(tmp_path):
    root = write_image_folder(tmp_path, counts={"train": 6, "val": 3})
    (root / "train" / "red" / "broken.jpg").write_bytes(_jpeg()[:500])
    (root / "train" / "blue" / "notes.png").write_bytes(b"not an image")
    (root / "val" / "green" / "cut.jpg").write_bytes(_jpeg()[:400])
    return root


def test_bad_examples_stop_the_run_naming_the_file(tmp_path):
    root = _with_bad_files(tmp_path)
    it = data.train_iterator("folder", batch_size=20, seed=0, data_dir=root, image_options=_options())
    with pytest.raises(images.BadImageError, match=r"(broken.jpg: corrupt or truncated|notes.png: not an image)"):
        _take(it, 2)


def test_skipped_examples_are_deterministic_substitutes_and_counted(tmp_path):
    root = _with_bad_files(tmp_path)
    kw = dict(batch_size=20, seed=0, data_dir=root, image_options=_options(on_bad_example="skip"))
    a = _take(data.train_iterator("folder", **kw), 2)  # 40 of 20 examples: both bad files are met
    b = _take(data.train_iterator("folder", workers=2, **kw), 2)
    skipped = [r for batch in a for r in batch["skipped"]]
    # each bad file once per epoch, more where a substitute is itself bad; only the bad files are named
    assert len(skipped) >= 4 and all("broken.jpg" in r or "notes.png" in r for r in skipped)
    assert any("broken.jpg" in r for r in skipped) and any("notes.png" in r for r in skipped)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["skipped"] == y["skipped"]
    evals = list(data.eval_batches("folder", "val", batch_size=16, data_dir=root,
                                   image_options=_options(on_bad_example="skip")))
    assert evals[0]["mask"].sum() == 9 and "cut.jpg" in evals[0]["skipped"][0]


def test_a_run_that_skips_bad_examples_counts_them_per_window_and_epoch(tmp_path, capsys):
    """Also: a model with more outputs than classes predicts class names only, and the run refuses to resume
    on a data set that changed since."""
    root = _with_bad_files(tmp_path / "data")
    cfg = _folder_config(root, "data.batch_size=10", "train.steps=6", "train.log_every_steps=2",
                         "train.checkpoint_every_steps=6", "data.on_bad_example=skip", "model.num_classes=5")
    fg.train(cfg, str(tmp_path / "run"))
    out = capsys.readouterr().out
    it = data.train_iterator("folder", batch_size=10, seed=cfg.seed, data_dir=root,
                             image_options=_options(augment=True, on_bad_example="skip"))
    per_step = [len(b["skipped"]) for b in _take(it, 6)]  # the pipeline itself: the reference
    rows = [r for r in read_metrics(str(tmp_path / "run")) if r["split"] == "train"]
    assert [r["skipped_examples"] for r in rows] == [sum(per_step[i:i + 2]) for i in (0, 2, 4)]
    for epoch in (1, 2):  # 20 examples = 2 batches an epoch; the last epoch is reported when a next one starts
        assert f"epoch {epoch}: skipped {sum(per_step[2 * epoch - 2:2 * epoch])} bad example(s)" in out
    if sum(per_step[4:]):
        assert f"epoch 3 (to step 6): skipped {sum(per_step[4:])} bad example(s)" in out
    assert out.count("skipped a bad example") == 2  # each bad file named once

    rows = fg.predict_files(str(tmp_path / "run"), str(root / "val" / "red"), top_k=3)
    assert all(sorted(c for c, _ in r["top"]) == ["blue", "green", "red"] for r in rows)  # outputs 3, 4: no class
    with pytest.raises(ValueError, match=r"top_k must be an integer in 1..3 \(the data set's classes\)"):
        fg.predict_files(str(tmp_path / "run"), str(root / "val" / "red"), top_k=4)
    shutil.copytree(root / "train" / "red", root / "train" / "yellow")  # 7 files (one bad): labels would shift
    with pytest.raises(fg.config.ConfigError, match=r"different data .*classes.*train examples 20 -> 27"):
        fg.train(cfg, str(tmp_path / "run"))


# --------------------------------------------------------------------------- a run, end to end


def _folder_config(root, *overrides):
    return fg.load_config(DIGITS, overrides=[
        "data.name=folder", f"data.dir={root}", f"data.image_size={SIZE}", "data.augment=True", "data.batch_size=24",
        "data.eval_batch_size=32", "model.num_classes=3", "train.steps=40", "train.log_every_steps=10",
        "train.eval_every_steps=0", "train.checkpoint_every_steps=20", "optimizer.warmup_steps=5",
        "log.tensorboard=False", "log.progress_bar=False", *overrides])


@pytest.fixture(scope="module")
def folder_run(folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("folder_run")
    summary = fg.train(_folder_config(folder), str(workdir))
    return workdir, summary


def test_a_folder_run_learns_and_predicts_class_names_without_the_data(folder, folder_run, tmp_path):
    workdir, summary = folder_run
    assert summary["val"]["accuracy"] >= 0.9  # 3 classes: chance is 0.33
    assert fg.evaluate(str(workdir), "val")["accuracy"] == summary["val"]["accuracy"]
    photos = tmp_path / "photos"
    shutil.copytree(folder / "val" / "green", photos)
    moved = folder.with_name(folder.name + "_moved")  # the data set is gone: the class names came with the run
    folder.rename(moved)
    try:
        rows = fg.predict_files(str(workdir), str(photos), top_k=2)
    finally:
        moved.rename(folder)
    assert len(rows) == 6 and all(len(r["top"]) == 2 for r in rows)
    assert sum(r["top"][0][0] == "green" for r in rows) >= 5
    assert json.load(open(workdir / "config.json"))["dataset"]["classes"] == ["blue", "green", "red"]


def test_cli_predict_on_image_files_prints_class_names(folder, folder_run, capsys):
    """``predict --input FILE FOLDER``: one "file -> class (p)" line per image, the rows in the JSON line last;
    batched decoding (--batch-size 4 over 7 files) gives what ``predict_files`` gives in one batch."""
    from fastgpu_jax import cli

    workdir, _ = folder_run
    one = str(folder / "val" / "red" / sorted(os.listdir(folder / "val" / "red"))[0])
    inputs = [one, str(folder / "val" / "blue")]
    assert cli.main(["predict", "--workdir", str(workdir), "--input", *inputs, "--top-k", "3",
                     "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    ref = fg.predict_files(str(workdir), inputs, top_k=3)
    assert summary["count"] == 7 and [r["file"] for r in summary["predictions"]] == [r["file"] for r in ref]
    for got, want in zip(summary["predictions"], ref):
        assert [c for c, _ in got["top"]] == [c for c, _ in want["top"]]
        np.testing.assert_allclose([p for _, p in got["top"]], [p for _, p in want["top"]], rtol=1e-5)
    assert lines[0].startswith(f"{one} -> ") and lines[0].count("(") == 3
    assert cli.main(["predict", "--workdir", str(workdir), "--input", one, "x.npy"]) == 2
    assert "ONE .npy array, or image files" in capsys.readouterr().err
    with pytest.raises(ValueError, match="top_k must be an integer in 1..3"):
        fg.predict_files(str(workdir), one, top_k=4)


def test_quantize_a_folder_run_normalises_its_uint8_batches(folder_run):
    """int8 PTQ of an image-set run: its float accuracy is ``evaluate``'s (same uint8 batches, normalised on the
    device with the recorded mean/std), the int8 model stays close, and the saved file evaluates alone."""
    from fastgpu_jax import quantize

    workdir, summary = folder_run
    result = quantize.quantize_run(str(workdir), calibrate_batches=2, split="val")
    assert result["float_accuracy"] == fg.evaluate(str(workdir), "val")["accuracy"]
    assert result["count"] == 18 and result["int8_accuracy"] >= result["float_accuracy"] - 0.12
    again = quantize.evaluate_quantized(result["path"], "val")
    assert again["accuracy"] == result["int8_accuracy"]


def test_a_sigkilled_run_with_workers_resumes_bit_identical(folder, folder_run, tmp_path):
    """Killed (with its decoding workers) after a checkpoint, resumed with another worker count: the same
    metrics and parameters as the uninterrupted run with no workers at all (``folder_run``)."""
    ref, _ = folder_run
    workdir = tmp_path / "killed"
    args = ["train", "--config", DIGITS, "--workdir", str(workdir)] + [
        f"--config.{o}" for o in ("data.name=folder", f"data.dir={folder}", f"data.image_size={SIZE}",
                                  "data.augment=True", "data.batch_size=24", "data.eval_batch_size=32",
                                  "model.num_classes=3", "train.steps=40", "train.log_every_steps=10",
                                  "train.eval_every_steps=0", "train.checkpoint_every_steps=20",
                                  "optimizer.warmup_steps=5", "log.tensorboard=False", "log.progress_bar=False")]
    proc = subprocess.Popen([sys.executable, "-m", "fastgpu_jax", *args, "--config.data.workers=2"], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not (workdir / "checkpoints" / "20").is_dir():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its worker processes
    proc.wait()
    assert (workdir / "checkpoints" / "20").is_dir(), "the run never reached its first checkpoint"
    out = run_cli(*args, "--config.data.workers=3")  # data.workers may change on a resume
    assert "resuming at step" in out.stdout
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert strip(read_metrics(str(workdir))) == strip(read_metrics(str(ref)))
    _, a, _ = fg.restore_state(str(workdir))
    _, b, _ = fg.restore_state(str(ref))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- TFDS array_record sets


def test_a_tfds_array_record_set_reads_like_the_folder_it_came_from(folder, tmp_path):
    """A folder written as a prepared TFDS set (Examples from protobuf's own encoder) gives the same examples,
    and the same eval batches, as the folder."""
    from fastgpu_jax.data import tfds_source
    from tfds_files import write_tfds

    splits = {theirs: [image_sources.folder_split(folder, ours)[i][:2]
                       for i in range(len(image_sources.folder_split(folder, ours)))]
              for ours, theirs in (("train", "train"), ("val", "validation"))}
    root = write_tfds(tmp_path / "colours" / "1.0.0", "colours", splits, ["blue", "green", "red"], shards=3)
    assert image_sources.split_sizes("tfds", root) == {"train": 60, "val": 18}
    assert image_sources.classes_and_stats("tfds", root)[0] == ("blue", "green", "red")
    ts = tfds_source.TFDSSplit(root, "val")
    order = [i for k in range(3) for i in range(k, 18, 3)]  # write_tfds deals examples round-robin into shards
    for j, i in enumerate(order):
        assert ts[j][:2] == splits["validation"][i]
    opts = _options()
    got = list(data.eval_batches("tfds", "val", batch_size=18, data_dir=root, image_options=opts))[0]
    want = list(data.eval_batches("folder", "val", batch_size=18, data_dir=folder, image_options=opts))[0]
    np.testing.assert_array_equal(got["image"], want["image"][order])
    np.testing.assert_array_equal(got["label"], want["label"][order])
    it = data.train_iterator("tfds", batch_size=12, seed=0, data_dir=root, image_options=opts, workers=2)
    labels = np.concatenate([b["label"] for b in _take(it, 5)])  # one epoch: every example once
    np.testing.assert_array_equal(np.bincount(labels), [20, 20, 20])


def test_tfds_sets_in_other_formats_or_incomplete_are_refused(folder, tmp_path):
    from fastgpu_jax.data import tfds_source
    from tfds_files import write_tfds

    raw = image_sources.folder_split(folder, "val")[0][:2]
    root = write_tfds(tmp_path / "v", "colours", {"train": [raw] * 4}, ["blue", "green", "red"])
    with pytest.raises(FileNotFoundError, match="has no 'test' split"):
        tfds_source.TFDSSplit(root, "test")
    os.remove(root / "colours-train.array_record-00001-of-00002")
    with pytest.raises(FileNotFoundError, match=r"colours-train.array_record-00001-of-00002' is missing"):
        tfds_source.TFDSSplit(root, "train")
    info = json.loads((root / "dataset_info.json").read_text())
    (root / "dataset_info.json").write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    with pytest.raises(ValueError, match="prepared as 'tfrecord'.*array_record"):
        image_sources.classes_and_stats("tfds", root)
    with pytest.raises(FileNotFoundError, match="dataset_info.json' not found"):
        image_sources.split_sizes("tfds", tmp_path)


def test_tfds_example_parsing_matches_protobuf_and_names_corrupt_records():
    """Negative and unpacked int64s, several values, float features skipped; a corrupt record is a ValueError."""
    from fastgpu_jax.data import tfds_source
    from tfds_files import example_class

    Example = example_class()
    ex = Example()
    ex.features.feature["image"].bytes_list.value.extend([b"\x00\xffabc", b""])
    ex.features.feature["label"].int64_list.value.extend([-1, 2**63 - 1, -2**63, 7])
    ex.features.feature["score"].float_list.value.append(0.25)
    raw = ex.SerializeToString()
    assert tfds_source.parse_example(raw) == {"image": [b"\x00\xffabc", b""], "label": [-1, 2**63 - 1, -2**63, 7]}
    # the same int64s unpacked (proto2 writers): field 1, varint wire type, one by one
    unpacked = b"".join(b"\x08" + tfds_source_varint(v % 2**64) for v in (-1, 5))
    feature = b"\x1a" + tfds_source_varint(len(unpacked)) + unpacked  # Feature.int64_list = 3
    entry = b"\x0a\x05label" + b"\x12" + tfds_source_varint(len(feature)) + feature
    features = b"\x0a" + tfds_source_varint(len(entry)) + entry
    record = b"\x0a" + tfds_source_varint(len(features)) + features
    assert tfds_source.parse_example(record) == {"label": [-1, 5]}
    for bad in (raw[:-3], b"\x08\x01", b"\x0a\x05\x08"):  # truncated; a varint where a message goes; short
        with pytest.raises(ValueError):
            tfds_source.parse_example(bad)


def tfds_source_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)
