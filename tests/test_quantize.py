"""int8 post-training quantization: weight round trip, the int8 Dense/Conv forward against float within bounds
derived from the scales, quantize_run on the digits CNN (accuracy drop, compression), the saved file, the CLI."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import flax.linen as flax_nn

import fastgpu_jax as fg
from conftest import run_cli
from fastgpu_jax import cli
from fastgpu_jax import quantize as Q
from fastgpu_jax.nn import Conv, Dense

@pytest.fixture(scope="module")
def trained(trained_digits):
    """The shared 200-step digits run (tests/conftest.py)."""
    return trained_digits


@pytest.fixture(scope="module")
def quantized(trained):
    return fg.quantize_run(str(trained), calibrate_batches=4)


@pytest.fixture(scope="module")
def restored(trained):
    cfg, state, _ = fg.restore_state(str(trained))
    return fg.build_model(cfg), state


class _Mixed(flax_nn.Module):
    """Conv + BatchNorm + Dense + LayerNorm: kernels are quantized, the rest stays float."""

    @flax_nn.compact
    def __call__(self, x, train: bool = False):
        x = flax_nn.BatchNorm(use_running_average=not train)(Conv(4, (3, 3))(x))
        x = flax_nn.LayerNorm()(Dense(5)(x.reshape((x.shape[0], -1))))
        return Dense(3)(x)


@pytest.mark.parametrize("shape", [(5, 7), (3, 3, 4, 6), (2, 1, 3)])
def test_weight_round_trip_error_is_at_most_half_a_step(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.3
    w[..., 1] = 0.0  # an all-zero channel must not divide by zero
    q, scale = Q.quantize_tensor(w)
    q, scale = np.asarray(q), np.asarray(scale)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (shape[-1],) and scale.dtype == np.float32
    assert np.abs(q.astype(np.int32)).max() <= 127
    channel_max = np.abs(q.astype(np.int32)).reshape(-1, shape[-1]).max(0)
    assert (channel_max[np.arange(shape[-1]) != 1] == 127).all() and channel_max[1] == 0
    np.testing.assert_allclose(scale[0], np.abs(w[..., 0]).max() / 127, rtol=1e-6)
    err = np.abs(w - np.asarray(Q.dequantize_tensor(q, scale)))
    assert (err <= scale / 2 * (1 + 1e-5) + 1e-12).all()


def test_quantize_params_splits_kernels_from_float_params():
    model = _Mixed()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2)))
    qvars = Q.quantize_variables(variables["params"], variables["batch_stats"])
    flat_q = jax.tree_util.tree_leaves_with_path(qvars["int8"])
    assert flat_q and all(x.dtype == jnp.int8 and x.ndim >= 2 for _, x in flat_q)
    assert all(str(p[-1].key) == "kernel" for p, _ in flat_q)
    for path, x in jax.tree_util.tree_leaves_with_path(qvars["float"]):  # biases and BatchNorm params
        assert x.dtype == jnp.float32 and (x.ndim < 2 or str(path[-1].key) != "kernel")
    assert sorted(qvars["int8"]) == ["Conv_0", "Dense_0", "Dense_1"] and qvars["batch_stats"]
    assert set(qvars["float"]) == {"Conv_0", "Dense_0", "Dense_1", "BatchNorm_0", "LayerNorm_0"}
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    n_split = sum(x.size for x in jax.tree.leaves((qvars["int8"], qvars["float"])))
    assert n_params == n_split


def _scaled(x, w):
    q, w_scale = Q.quantize_tensor(w)
    x_scale = jnp.max(jnp.abs(x)) / 127  # calibrated on this very input: no clipping
    return q, w_scale, x_scale, Q.dequantize_tensor(q, w_scale)


def _int8_apply(layer, params, q, w_scale, x_scale, x):
    variables = {"params": params, "int8": {"kernel": q}, "scales": {"kernel": w_scale},
                 "input_scales": {"kernel": x_scale}}
    with Q.int8_layers():
        return layer.apply(variables, x)


def test_int8_dense_matches_float_within_the_quantization_bound():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 3, 40)), jnp.float32)  # leading batch dims, as in a ViT
    layer = Dense(24)
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    params["bias"] = jnp.asarray(rng.standard_normal(24), jnp.float32)
    w = params["kernel"]
    q, w_scale, x_scale, w_hat = _scaled(x, w)
    y_ref = layer.apply({"params": params}, x)
    y = _int8_apply(layer, params, q, w_scale, x_scale, x)
    # |x.w - x^.w^| <= sum_k |x_k| s_w/2 + s_x/2 |w^_k|   (+ float32 rounding of the reference)
    bound = jnp.abs(x) @ jnp.ones_like(w) * w_scale / 2 + x_scale / 2 * (jnp.ones_like(x) @ jnp.abs(w_hat))
    bound = bound + 1e-5 * (jnp.abs(x) @ jnp.abs(w)) + 1e-6
    err = jnp.abs(y - y_ref)
    assert y.shape == y_ref.shape == (4, 3, 24) and y.dtype == jnp.float32
    assert bool(jnp.all(err <= bound)), float(jnp.max(err - bound))
    assert float(jnp.max(err)) > 0  # it really is the quantized computation
    jaxpr = str(jax.make_jaxpr(lambda x: _int8_apply(layer, params, q, w_scale, x_scale, x))(x))
    assert "dot_general" in jaxpr and "i8[" in jaxpr and "preferred_element_type=int32" in jaxpr


@pytest.mark.parametrize("strides, padding, groups", [(2, "SAME", 1), (2, "VALID", 1),
                                                      (1, ((1, 2), (0, 1)), 1), (2, "SAME", 2)])
def test_int8_conv_matches_float_within_the_quantization_bound(strides, padding, groups):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 9, 11, 4)), jnp.float32)
    layer = Conv(6, (3, 3), strides=strides, padding=padding, feature_group_count=groups)
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    params["bias"] = jnp.asarray(rng.standard_normal(6), jnp.float32)
    w = params["kernel"]
    q, w_scale, x_scale, w_hat = _scaled(x, w)
    y_ref = layer.apply({"params": params}, x)
    y = _int8_apply(layer, params, q, w_scale, x_scale, x)

    def conv(a, k):  # the same window as the layer; zero padding contributes no error
        dn = lax.conv_dimension_numbers(a.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
        return lax.conv_general_dilated(a, k, (strides, strides), padding, dimension_numbers=dn,
                                        feature_group_count=groups, precision=lax.Precision.HIGHEST)

    bound = conv(jnp.abs(x), jnp.ones_like(w)) * w_scale / 2 + x_scale / 2 * conv(jnp.ones_like(x), jnp.abs(w_hat))
    bound = bound + 1e-5 * conv(jnp.abs(x), jnp.abs(w)) + 1e-6
    err = jnp.abs(y - y_ref)
    assert y.shape == y_ref.shape
    assert bool(jnp.all(err <= bound)), float(jnp.max(err - bound))
    assert float(jnp.max(err)) > 0
    jaxpr = str(jax.make_jaxpr(lambda x: _int8_apply(layer, params, q, w_scale, x_scale, x))(x))
    assert "conv_general_dilated" in jaxpr and "i8[" in jaxpr and "preferred_element_type=int32" in jaxpr


@pytest.mark.parametrize("layer, shape", [
    (Conv(5, 3), (2, 9, 4)),  # 1-D (an int kernel_size, as in flax)
    (Conv(5, (3, 3), padding="CIRCULAR"), (2, 7, 6, 4)),
    (Conv(5, (3, 3), mask=jnp.asarray(np.tril(np.ones((3, 3, 4, 5), np.float32)))), (2, 7, 6, 4)),
    (Conv(5, (3, 3), input_dilation=2, padding=1), (2, 7, 6, 4)),
    (Dense(5, dot_general=lax.dot_general), (2, 4)),  # a user-supplied op
])
def test_calibrated_layers_the_int8_op_does_not_cover_run_weight_only(layer, shape):
    x = jnp.asarray(np.random.default_rng(3).standard_normal(shape), jnp.float32)
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    q, w_scale, x_scale, w_hat = _scaled(x, params["kernel"])
    dequantized = {**params, "kernel": w_hat}  # what quantized_variables passes as params
    y = _int8_apply(layer, dequantized, q, w_scale, x_scale, x)
    np.testing.assert_array_equal(y, layer.apply({"params": dequantized}, x))


def test_calibration_records_max_abs_input_per_layer(restored):
    model, state = restored
    batches = [b for b, _ in zip(fg.data.eval_batches("digits", "val", batch_size=60), range(2))]
    scales = Q.calibrate(model, state.variables, batches)
    assert set(scales) == {"conv0", "conv1", "hidden", "head"}
    first = max(float(np.abs(b["image"]).max()) for b in batches)  # conv0 sees the normalised images
    np.testing.assert_allclose(float(scales["conv0"]["kernel"]), first / 127, rtol=1e-6)
    assert all(float(s["kernel"]) > 0 for s in scales.values())


def test_weight_only_equals_the_float_model_on_dequantized_weights(restored):
    model, state = restored
    qvars = Q.quantize_variables(state.params, state.batch_stats)  # no input scales: weight-only
    x = next(fg.data.eval_batches("digits", "test", batch_size=64))["image"]
    y = jax.jit(lambda v, x: Q.quantized_apply(model, v, x))(qvars, x)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    y_ref = apply({"params": Q.dequantized_params(qvars)}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)
    assert "preferred_element_type=int32" not in str(jax.make_jaxpr(
        lambda v, x: Q.quantized_apply(model, v, x))(qvars, x))
    y_float = apply(state.variables, x)
    assert (np.asarray(y).argmax(-1) == np.asarray(y_float).argmax(-1)).mean() > 0.97


def test_quantize_run_meets_accuracy_and_compression_targets(trained, quantized):
    r = quantized
    assert r["float_accuracy"] == fg.evaluate(str(trained), "test")["accuracy"]
    assert r["float_accuracy"] > 0.95 and r["count"] == 360 and r["quantized_layers"] == 4
    assert r["accuracy_drop"] <= 0.01
    assert r["compression"] >= 3.5
    kernels = 3 * 3 * 1 * 32 + 3 * 3 * 32 * 64 + 2 * 2 * 64 * 128 + 128 * 10
    biases = 32 + 64 + 128 + 10
    assert r["float_bytes"] == 4 * (kernels + biases)
    assert r["int8_bytes"] == kernels + 4 * biases + 4 * biases + 4 * 4  # int8 + scales + biases + input scales
    assert r["compression"] == pytest.approx(r["float_bytes"] / r["int8_bytes"])


def test_saved_quantized_file_reloads_to_the_same_int8_accuracy(trained, quantized, restored):
    path = trained / "quantized" / "params.msgpack"
    assert path.exists() and quantized["path"] == str(path)
    assert json.loads((trained / "quantized" / "metrics.json").read_text())["int8_accuracy"] == \
        quantized["int8_accuracy"]
    cfg, qvars, meta = fg.load_quantized(str(path))
    assert cfg.model.name == "cnn" and meta["step"] == 200 and meta["calibrate_batches"] == 4
    assert all(np.asarray(x).dtype == np.int8 for x in jax.tree.leaves(qvars["int8"]))
    assert set(qvars["input_scales"]) == {"conv0", "conv1", "hidden", "head"}
    assert os.path.getsize(path) < 0.3 * sum(4 * np.size(x) for x in jax.tree.leaves(restored[1].params))
    result = fg.evaluate_quantized(str(trained), "test")
    assert result["accuracy"] == quantized["int8_accuracy"] and result["count"] == 360
    # the int8 layers really run int8 x int8 -> int32
    model = fg.build_model(cfg)
    jaxpr = str(jax.make_jaxpr(lambda v, x: Q.quantized_apply(model, v, x))(qvars, jnp.zeros((2, 8, 8, 1))))
    assert jaxpr.count("preferred_element_type=int32") == 4


def test_cli_quantize_prints_a_table_and_a_json_line(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    proc = run_cli("quantize", "--workdir", str(workdir), "--calibrate-batches", "1")
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert {"float_accuracy", "int8_accuracy", "accuracy_drop", "float_bytes", "int8_bytes",
            "compression"} <= set(result)
    assert result["calibrate_batches"] == 1 and result["accuracy_drop"] <= 0.01 and result["compression"] >= 3.5
    assert any("compression" in x for x in lines[:-1]) and any(x.startswith("float32") for x in lines)
    assert (workdir / "quantized" / "params.msgpack").exists()


def test_no_checkpoint_is_one_clear_line(trained, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["quantize", "--workdir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgpu-jax: error:") and "config.json" in err and len(err.strip().splitlines()) == 1
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(trained / "config.json", no_ckpt / "config.json")
    assert cli.main(["quantize", "--workdir", str(no_ckpt)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "train first" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="calibrate_batches"):
        fg.quantize_run(str(trained), calibrate_batches=-1)
    with pytest.raises(FileNotFoundError, match="quantize"):
        fg.load_quantized(str(empty))
