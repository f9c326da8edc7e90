"""fastgpu_jax.models: shapes, published parameter counts, BatchNorm state, dropout, bf16, and that the
models are built only from fastgpu_jax.nn layers (so the op backend applies to all of them)."""

import collections
import math

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastgpu_jax import models
from fastgpu_jax.nn import backend as B

# RngBitGenerator-based keys: on CPU their sampling compiles several times faster than threefry's, which
# dominates the run time of these tests otherwise. The layers and models are key-agnostic.
KEY = jax.random.key(0, impl="rbg")
RESNETS = ("resnet18", "resnet34", "resnet50")
# torchvision's published parameter counts (1000 classes, weights + BN affine, no BN running stats).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


def _x(shape, seed=0):
    """Random normal images (numpy: no XLA compile per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _abstract_init(model, shape):
    return jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct(shape, jnp.float32))


def _abstract_apply(model, variables, shape, **kwargs):
    return jax.eval_shape(lambda v, x: model.apply(v, x, **kwargs), variables,
                          jax.ShapeDtypeStruct(shape, jnp.float32))


def _count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _kernels(params):
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if getattr(path[-1], "key", None) == "kernel"]


# Real (not abstract) ResNet runs all use this one narrow configuration, so that the op-by-op compiles
# are shared between tests.
SMALL_RESNET = dict(num_classes=10, stem="cifar", width=8)
CIFAR = (2, 32, 32, 3)


@pytest.fixture(scope="module")
def small_resnet():
    model = models.build("resnet18", **SMALL_RESNET)
    x = _x(CIFAR)
    return model, x, model.init(KEY, x)


# --- shapes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cnn", "mlp"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (2, 28, 28, 1)])
def test_small_models_output_shape(name, shape):
    model = models.build(name, num_classes=7, width=8)
    x = _x(shape)
    variables = model.init(KEY, x)
    logits = model.apply(variables, x)
    assert logits.shape == (shape[0], 7) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    # Default width too (cnn 32, mlp 256), abstractly.
    model = models.build(name, num_classes=7)
    assert _abstract_apply(model, _abstract_init(model, shape), shape).shape == (shape[0], 7)


@pytest.mark.parametrize("name", RESNETS)
@pytest.mark.parametrize("stem, shape", [("cifar", (2, 32, 32, 3)), ("imagenet", (1, 224, 224, 3))])
def test_resnet_output_shape(name, stem, shape):
    model = models.build(name, num_classes=10, stem=stem)
    variables = _abstract_init(model, shape)
    for train in (False, True):
        out = _abstract_apply(model, variables, shape, train=train, mutable=["batch_stats"] if train else False)
        logits = out[0] if train else out
        assert logits.shape == (shape[0], 10) and logits.dtype == jnp.float32


def test_default_widths():
    for name, shape, first, width in [("cnn", (1, 8, 8, 1), "conv0", 32), ("mlp", (1, 8, 8, 1), "hidden0", 256),
                                      ("resnet18", (1, 32, 32, 3), "stem_conv", 64)]:
        params = _abstract_init(models.build(name, stem="cifar"), shape)["params"]
        assert params[first]["kernel"].shape[-1] == width, name
        assert params["head"]["kernel"].shape[-1] == 10, name  # default num_classes


# --- parameter counts -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RESNETS)
def test_resnet_parameter_count_matches_torchvision(name):
    variables = _abstract_init(models.build(name, num_classes=1000, stem="imagenet"), (1, 224, 224, 3))
    assert _count(variables["params"]) == TORCHVISION_PARAMS[name]
    for leaf in jax.tree_util.tree_leaves(variables):
        assert leaf.dtype == jnp.float32


def test_resnet50_is_v1_5_stride_on_3x3():
    """v1.5 downsamples in the 3x3 conv of the first bottleneck of a stage, not in the first 1x1."""
    model = models.build("resnet50", num_classes=1000, stem="imagenet")
    shape = (1, 224, 224, 3)
    _, state = _abstract_apply(model, _abstract_init(model, shape), shape, capture_intermediates=True,
                               mutable=["intermediates"])
    block = state["intermediates"]["stage1_block0"]
    assert block["Conv_0"]["__call__"][0].shape[1:3] == (56, 56)
    assert block["Conv_1"]["__call__"][0].shape[1:3] == (28, 28)
    assert block["proj_conv"]["__call__"][0].shape[1:3] == (28, 28)


def test_resnet_last_bn_of_each_branch_is_zero_initialised(small_resnet):
    params = small_resnet[2]["params"]
    blocks = [k for k in params if k.startswith("stage")]
    assert len(blocks) == 8
    for k in blocks:
        np.testing.assert_array_equal(params[k]["BatchNorm_1"]["scale"], 0.0)
        np.testing.assert_array_equal(params[k]["BatchNorm_0"]["scale"], 1.0)
    np.testing.assert_array_equal(params["stem_bn"]["scale"], 1.0)


def test_resnet_zero_init_residual_can_be_turned_off():
    # Two one-block stages (the flag acts per block; depth adds nothing), initialised in one compile.
    model = models.ResNet(stage_sizes=(1, 1), block=models.resnet.BasicBlock, num_classes=10, stem="cifar",
                          width=8, zero_init_residual=False)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    assert len([k for k in params if k.startswith("stage")]) == 2
    blocks = [k for k in params if k.startswith("stage")]
    for k in blocks:
        np.testing.assert_array_equal(params[k]["BatchNorm_1"]["scale"], 1.0)


# --- BatchNorm state --------------------------------------------------------------------------------

def test_resnet_runs_on_cifar_input(small_resnet):
    model, x, variables = small_resnet
    logits = model.apply(variables, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_resnet_has_batch_stats_and_cnn_does_not(small_resnet):
    _, _, variables = small_resnet
    assert set(variables) == {"params", "batch_stats"}
    stats = variables["batch_stats"]
    assert set(stats["stem_bn"]) == {"mean", "var"}
    for path, leaf in jax.tree_util.tree_leaves_with_path(stats):
        assert leaf.dtype == jnp.float32
        np.testing.assert_array_equal(leaf, 0.0 if path[-1].key == "mean" else 1.0)
    for name in ("cnn", "mlp"):
        assert set(_abstract_init(models.build(name), (2, 8, 8, 1))) == {"params"}


def test_resnet_train_updates_batch_stats(small_resnet):
    model, x, variables = small_resnet
    logits, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                                capture_intermediates=True)
    new, old = state["batch_stats"], variables["batch_stats"]
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(old)
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old))]
    assert all(changed)
    # The stem BN's running stats follow momentum 0.9 towards the batch statistics of the stem conv's output.
    conv_out = state["intermediates"]["stem_conv"]["__call__"][0]
    np.testing.assert_allclose(new["stem_bn"]["mean"], 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["stem_bn"]["var"], 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-6)
    # Training mode normalises with the batch statistics, so it differs from eval mode on fresh stats.
    assert not np.allclose(logits, model.apply(variables, x, train=False))


def test_resnet_train_needs_mutable_batch_stats(small_resnet):
    model, x, variables = small_resnet
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        model.apply(variables, x, train=True)


def test_resnet_eval_uses_running_stats_without_mutable(small_resnet):
    model, x, variables = small_resnet
    y0 = model.apply(variables, x, train=False)  # no mutable= needed; returns logits only
    assert isinstance(y0, jax.Array) and y0.shape == (2, 10)
    np.testing.assert_array_equal(y0, model.apply(variables, x, train=False))  # deterministic
    # Nothing is written in eval mode even if batch_stats is offered as mutable.
    _, state = model.apply(variables, x, train=False, mutable=["batch_stats"])
    for a, b in zip(jax.tree_util.tree_leaves(state["batch_stats"]),
                    jax.tree_util.tree_leaves(variables["batch_stats"])):
        np.testing.assert_array_equal(a, b)
    # ...and the running stats it reads matter: updated stats give different logits.
    _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    y1 = model.apply({"params": variables["params"], **state}, x, train=False)
    assert not np.allclose(y0, y1)


# --- dropout ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_dropout_is_random_in_train_and_off_in_eval(name):
    x = _x((2, 28, 28, 1))
    model = models.build(name, num_classes=10, width=8, dropout_rate=0.5)
    variables = model.init(KEY, x)
    k1, k2 = jax.random.key(1, impl="rbg"), jax.random.key(2, impl="rbg")
    t1 = model.apply(variables, x, train=True, rngs={"dropout": k1})
    t1_again = model.apply(variables, x, train=True, rngs={"dropout": k1})
    t2 = model.apply(variables, x, train=True, rngs={"dropout": k2})
    np.testing.assert_array_equal(t1, t1_again)
    assert not np.allclose(t1, t2)
    # Eval: deterministic, needs no rng, and equals the same network without dropout.
    e = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(e, model.apply(variables, x, train=False))
    no_dropout = models.build(name, num_classes=10, width=8, dropout_rate=0.0)
    np.testing.assert_allclose(e, no_dropout.apply(variables, x, train=True), rtol=1e-6, atol=1e-6)
    assert not np.allclose(t1, e)
    with pytest.raises(flax.errors.InvalidRngError):
        model.apply(variables, x, train=True)  # train mode with dropout needs a dropout rng


def test_resnet_dropout_acts_in_training_only():
    """Dropout before the head: train-mode logits change (and follow the 'dropout' rng), eval-mode logits and
    the params do not, so a checkpoint loads whatever the rate."""
    x = _x(CIFAR)
    plain = models.build("resnet18", **SMALL_RESNET)
    dropped = models.build("resnet18", dropout_rate=0.5, **SMALL_RESNET)
    variables = plain.init(KEY, x)
    jax.tree.map(np.testing.assert_array_equal, variables, dropped.init(KEY, x))

    def train(model, seed):
        return model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(seed, impl="rbg")},
                           mutable=["batch_stats"])[0]

    t_plain, t1, t2 = train(plain, 1), train(dropped, 1), train(dropped, 2)
    assert not np.allclose(t1, t_plain) and not np.allclose(t1, t2)
    np.testing.assert_array_equal(dropped.apply(variables, x), plain.apply(variables, x))


# --- bfloat16 compute -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, shape, kwargs", [
    ("cnn", (2, 28, 28, 1), dict(width=8)),
    ("mlp", (2, 28, 28, 1), dict(width=8)),
    ("resnet18", CIFAR, dict(width=SMALL_RESNET["width"], stem="cifar")),
])
def test_bf16_compute(name, shape, kwargs):
    x = _x(shape)
    m32 = models.build(name, num_classes=10, **kwargs)
    m16 = models.build(name, num_classes=10, dtype=jnp.bfloat16, **kwargs)
    v16 = m16.init(KEY, x)
    v32 = m32.init(KEY, x)
    for leaf in jax.tree_util.tree_leaves(v16):  # params (and BN stats) stay float32
        assert leaf.dtype == jnp.float32
    for a, b in zip(jax.tree_util.tree_leaves(v16), jax.tree_util.tree_leaves(v32)):
        np.testing.assert_array_equal(a, b)
    # Non-trivial BN state, so that eval mode exercises the running statistics.
    if "batch_stats" in v32:
        _, state = m32.apply(v32, x, train=True, mutable=["batch_stats"])
        v32 = v16 = {"params": v32["params"], **state}
    # Every layer computes in bf16, not just the logits (abstractly: no extra compiles).
    _, inter = jax.eval_shape(lambda v, inp: m16.apply(v, inp, capture_intermediates=True,
                                                       mutable=["intermediates"]), v16, x)
    outputs = jax.tree_util.tree_leaves(inter["intermediates"])
    assert len(outputs) > 3 and all(o.dtype == jnp.bfloat16 for o in outputs)
    y16, y32 = m16.apply(v16, x), m32.apply(v32, x)
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32 and y16.shape == y32.shape
    scale = float(jnp.abs(y32).max())
    assert scale > 0
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05 * scale + 1e-3, rtol=0.05)


# --- registry -----------------------------------------------------------------------------------------

def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError) as err:
        models.build("resnet19")
    assert "resnet19" in str(err.value)
    assert set(models.MODEL_NAMES) >= {"cnn", "mlp", *RESNETS}
    for name in models.MODEL_NAMES:
        assert name in str(err.value)


def test_the_registry_knows_which_optional_keys_each_model_acts_on(monkeypatch):
    assert models.accepted_keys("resnet50") == set(models.OPTIONAL_KEYS)
    assert models.accepted_keys("cnn") == models.accepted_keys("mlp") == {"width", "dropout_rate"}
    assert models.accepted_keys("vit_s4") == {"dropout_rate", "drop_path_rate"}
    assert "variant" in models.why_ignored("vit_s4", "width") and "ResNet" in models.why_ignored("cnn", "stem")
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # registrations end with this test
    monkeypatch.setattr(models, "_KEYS", dict(models._KEYS))
    factory = lambda num_classes, width, dropout_rate, stem, dtype, bn_axis_name=None: models.CNN(  # noqa: E731
        num_classes, width or 4, dropout_rate, dtype)
    models.register("mine", factory)
    assert "mine" in models.names() and "mine" not in models.MODEL_NAMES and not models.accepted_keys("mine")
    assert "accepts=()" in models.why_ignored("mine", "width")
    assert models.build("mine").width == 4  # a registered model gets width=None: "your usual width"
    models.register("mine", factory, accepts=["width"])
    assert models.accepted_keys("mine") == {"width"}
    with pytest.raises(ValueError, match=r"tuple of key names.*\('width',\)"):
        models.register("mine", factory, accepts="width")
    with pytest.raises(ValueError, match="'depth'.*width, stem, dropout_rate"):
        models.register("mine", factory, accepts=("depth",))


def test_unknown_resnet_stem_is_an_error():
    with pytest.raises(ValueError, match="stem"):
        _abstract_init(models.build("resnet18", stem="tiny"), (1, 32, 32, 3))


# --- built only from fastgpu_jax.nn layers -------------------------------------------------------------

ALL_MODELS = [("cnn", "imagenet", (2, 28, 28, 1)), ("mlp", "imagenet", (2, 28, 28, 1))] + [
    (name, stem, shape) for name in RESNETS
    for stem, shape in [("cifar", (2, 32, 32, 3)), ("imagenet", (1, 224, 224, 3))]]


@pytest.mark.parametrize("name, stem, shape", ALL_MODELS)
def test_every_kernel_goes_through_the_backend_dispatch(monkeypatch, name, stem, shape):
    model = models.build(name, num_classes=10, stem=stem)
    variables = _abstract_init(model, shape)
    calls = collections.Counter()
    seen_shapes = []

    def counting(op, fn):
        def wrapper(x, kernel, *args, **kwargs):
            calls[op] += 1
            seen_shapes.append(tuple(kernel.shape))
            return fn(x, kernel, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(B, "matmul", counting("matmul", B.matmul))
    monkeypatch.setattr(B, "dense", counting("matmul", B.dense))  # Dense with a fused activation
    monkeypatch.setattr(B, "conv2d", counting("conv2d", B.conv2d))
    _abstract_apply(model, variables, shape, train=False)

    kernels = _kernels(variables["params"])
    assert kernels
    assert calls["matmul"] == sum(k.ndim == 2 for k in kernels)
    assert calls["conv2d"] == sum(k.ndim == 4 for k in kernels)
    assert calls["matmul"] + calls["conv2d"] == len(kernels)
    assert sorted(seen_shapes) == sorted(tuple(k.shape) for k in kernels)


@pytest.mark.parametrize("name, stem, shape", [ALL_MODELS[0], ALL_MODELS[1], ALL_MODELS[2]])
def test_models_follow_use_backend(monkeypatch, name, stem, shape):
    """Every op of a model honours ``use_backend``: with no pallas kernel, pallas fails on the first op;
    with a (recording) pallas kernel, every op runs on it and the logits equal the xla ones."""
    from fastgpu_jax.nn import use_backend

    model = models.build(name, num_classes=10, stem=stem, width=8)
    x = _x(shape)
    variables = model.init(KEY, x)
    want = model.apply(variables, x)

    monkeypatch.setattr(B, "_load_kernels", lambda: None)
    for op in B.OPS:
        monkeypatch.delitem(B._IMPLS[op], "pallas", raising=False)
    with use_backend("pallas"), pytest.raises(NotImplementedError):
        model.apply(variables, x)

    used = collections.Counter()

    def recording(op, backend, fn):
        def impl(*args, **kwargs):
            used[(op, backend)] += 1
            return fn(*args, **kwargs)
        return impl

    for op in B.OPS:
        xla = B._IMPLS[op]["xla"]
        monkeypatch.setitem(B._IMPLS[op], "xla", recording(op, "xla", xla))
        monkeypatch.setitem(B._IMPLS[op], "pallas", recording(op, "pallas", xla))
    with use_backend("pallas"):
        got = model.apply(variables, x)
    np.testing.assert_array_equal(got, want)
    assert {b for _, b in used} == {"pallas"}
    assert sum(used.values()) == len(_kernels(variables["params"]))
