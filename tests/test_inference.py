"""Inference: load_model (params only, padded batches) against fg.predict, the one-file export round trip,
the latency table, and the export CLI."""

import json

import flax.serialization
import numpy as np
import pytest

import fastgpu_jax as fg
from conftest import TRAINED_STEPS, run_cli
from fastgpu_jax import cli

@pytest.fixture(scope="module")
def trained(trained_digits):
    """The shared 200-step digits run (tests/conftest.py)."""
    return trained_digits


@pytest.fixture(scope="module")
def test_images():
    images, labels = fg.data.load_split("digits", "test")
    return images[:, :, :, 0], labels  # raw pixels 0..16, (N, H, W): the channel axis is optional


@pytest.fixture(scope="module")
def reference(trained, test_images):
    """fg.predict's logits: all test images at the default batch (360), the first 50 at batch 16."""
    images, _ = test_images
    return fg.predict(str(trained), images), fg.predict(str(trained), images[:50], batch_size=16)


def test_load_model_equals_predict_and_compiles_once_per_batch_size(trained, test_images, reference):
    images, labels = test_images
    predict_fn, info = fg.load_model(str(trained), batch_size=16)
    assert info["step"] == TRAINED_STEPS and info["batch_size"] == 16 and info["image_shape"] == [8, 8, 1]
    assert info["param_count"] == 53002 and info["num_classes"] == 10
    assert set(predict_fn.variables) <= {"params", "batch_stats"}  # no optimizer state, no TrainState
    logits = predict_fn(images[:50])  # 3 full batches + a padded one
    assert logits.shape == (50, 10) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, reference[1])
    predict_fn(images[:7])
    assert predict_fn.forward._cache_size() == 1
    assert predict_fn(images[:0]).shape == (0, 10)
    assert (predict_fn(images).argmax(-1) == labels).mean() > 0.8
    with pytest.raises(ValueError, match=r"\(N, 8, 8, 1\)"):
        predict_fn(np.zeros((2, 28, 28)))


def test_export_round_trip_is_bit_identical(trained, test_images, reference, tmp_path):
    images, _ = test_images
    path = tmp_path / "model.msgpack"
    result = fg.export_params(str(trained), str(path))
    assert result["output"] == str(path) and result["bytes"] == path.stat().st_size and result["step"] == TRAINED_STEPS
    assert [p.name for p in tmp_path.iterdir()] == ["model.msgpack"]  # one file
    payload = flax.serialization.msgpack_restore(path.read_bytes())
    assert {"params", "batch_stats", "config", "dataset", "step", "format"} <= set(payload)
    assert "opt_state" not in payload
    assert json.loads(payload["config"])["model.name"] == "cnn"
    exported = fg.load_exported(str(path))
    assert exported.info["step"] == TRAINED_STEPS and exported.info["batch_size"] == 360  # data.eval_batch_size
    np.testing.assert_array_equal(exported(images), reference[0])
    small = fg.load_exported(str(path), batch_size=16)
    np.testing.assert_array_equal(small(images[:50]), reference[1])


def test_load_exported_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="export"):
        fg.load_exported(str(tmp_path / "nope.msgpack"))
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(flax.serialization.msgpack_serialize({"params": {}}))
    with pytest.raises(ValueError, match="not a fastgpu_jax export file"):
        fg.load_exported(str(bad))


def test_benchmark_inference_prints_a_table(trained, capsys):
    rows = fg.benchmark_inference(str(trained), batch_sizes=(1, 8), iters=3)
    assert [r["batch_size"] for r in rows] == [1, 8]
    for r in rows:
        assert r["latency_ms"] > 0 and r["images_per_s"] == pytest.approx(r["batch_size"] / r["latency_ms"] * 1e3)
    out = capsys.readouterr().out
    assert "latency ms" in out and "images/s" in out and len(out.strip().splitlines()) == 4


def test_cli_export_with_bench(trained, test_images, reference, tmp_path):
    images, _ = test_images
    path = tmp_path / "cli.msgpack"
    proc = run_cli("export", "--workdir", str(trained), "--output", str(path), "--bench", "--batch-sizes", "1,4",
                   "--iters", "2")
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["output"] == str(path) and path.exists() and result["step"] == TRAINED_STEPS
    assert [r["batch_size"] for r in result["bench"]] == [1, 4]
    assert any("latency ms" in x for x in lines[:-1])
    np.testing.assert_array_equal(fg.load_exported(str(path))(images), reference[0])


def test_export_errors_are_one_clear_line(trained, tmp_path, capsys):
    assert cli.main(["export", "--workdir", str(tmp_path), "--output", str(tmp_path / "m.msgpack")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgpu-jax: error:") and "config.json" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["export", "--workdir", str(trained)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "--bench" in err and len(err.strip().splitlines()) == 1
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "config.json").write_text((trained / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fg.load_model(str(no_ckpt))
