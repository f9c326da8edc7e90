"""fastgpu_jax.nn: Dense / Conv against flax.linen, and the op-backend dispatch (module > use_backend >
default_backend > xla)."""

import contextlib
import types

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastgpu_jax.nn as fnx
from fastgpu_jax.nn import backend as B

# RngBitGenerator-based keys: on CPU their sampling compiles several times faster than threefry's, which
# dominates the run time of these tests otherwise. The layers and models are key-agnostic.
KEY = jax.random.key(0, impl="rbg")
OTHER_KEY = jax.random.key(1, impl="rbg")


def _close(a, b, dtype=jnp.float32):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def _same_tree(a, b, dtype=jnp.float32):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype, (jax.tree_util.keystr(path), x, y)
        _close(x, y, dtype)


def _x(shape, dtype=jnp.float32, seed=2):
    """Random normal input (numpy: no XLA compile per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32)).astype(dtype)


# --- the layer cases ------------------------------------------------------------------------------

DENSE_CASES = {
    "2d": dict(shape=(3, 5), kw=dict(features=7)),
    "3d_BTD": dict(shape=(2, 4, 5), kw=dict(features=6)),
    "no_bias": dict(shape=(3, 5), kw=dict(features=7, use_bias=False)),
    "bf16": dict(shape=(3, 5), kw=dict(features=7, dtype=jnp.bfloat16)),
    "bf16_3d": dict(shape=(2, 4, 5), kw=dict(features=6, dtype=jnp.bfloat16)),
}

NCHW = (2, 9, 10, 4)  # odd spatial sizes make SAME/stride-2 padding asymmetric
CONV_CASES = {
    "k1": dict(shape=NCHW, kw=dict(features=6, kernel_size=1)),
    "k3": dict(shape=NCHW, kw=dict(features=6, kernel_size=3)),
    "k3x5": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 5))),
    "k3_stride2": dict(shape=NCHW, kw=dict(features=6, kernel_size=3, strides=2)),
    "k3x5_stride_1x2": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 5), strides=(1, 2))),
    "k3x5_stride2_valid": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 5), strides=2, padding="VALID")),
    "valid": dict(shape=NCHW, kw=dict(features=6, kernel_size=3, padding="VALID")),
    "pad_int": dict(shape=NCHW, kw=dict(features=6, kernel_size=3, padding=1)),
    "pad_int2_stride2": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 5), strides=2, padding=2)),
    "pad_pairs": dict(shape=NCHW, kw=dict(features=6, kernel_size=3, padding=((1, 2), (0, 1)))),
    "pad_pairs_stride2": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 5), strides=2,
                                                  padding=((2, 0), (1, 3)))),
    "dilation2": dict(shape=NCHW, kw=dict(features=6, kernel_size=3, kernel_dilation=2)),
    "dilation2_valid": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 2), kernel_dilation=2,
                                                padding="VALID")),
    "groups2": dict(shape=NCHW, kw=dict(features=6, kernel_size=3, feature_group_count=2)),
    "no_bias": dict(shape=NCHW, kw=dict(features=6, kernel_size=3, use_bias=False)),
    "unbatched_hwc": dict(shape=NCHW[1:], kw=dict(features=6, kernel_size=3)),
    "unbatched_stride2": dict(shape=NCHW[1:], kw=dict(features=6, kernel_size=(3, 5), strides=2)),
    "bf16": dict(shape=NCHW, kw=dict(features=6, kernel_size=3, dtype=jnp.bfloat16)),
    "bf16_stride2_groups": dict(shape=NCHW, kw=dict(features=6, kernel_size=3, strides=2,
                                                    feature_group_count=2, dtype=jnp.bfloat16)),
}


def _flax_kw(kind, kw):
    """flax.linen.Conv reads an int kernel_size as 1-D; ours (2-D only) as (k, k)."""
    kw = dict(kw)
    if kind == "conv" and isinstance(kw["kernel_size"], int):
        kw["kernel_size"] = (kw["kernel_size"],) * 2
    return kw


def _pair(kind, kw):
    ours = (fnx.Dense if kind == "dense" else fnx.Conv)(**kw)
    ref = (fnn.Dense if kind == "dense" else fnn.Conv)(**_flax_kw(kind, kw))
    return ours, ref


ALL_CASES = ([pytest.param("dense", c, id=f"dense-{n}") for n, c in DENSE_CASES.items()]
             + [pytest.param("conv", c, id=f"conv-{n}") for n, c in CONV_CASES.items()])


@pytest.mark.parametrize("kind, case", ALL_CASES)
def test_params_and_outputs_match_flax(kind, case):
    ours, ref = _pair(kind, case["kw"])
    dtype = case["kw"].get("dtype", jnp.float32)
    x = _x(case["shape"])
    # Eager on purpose: op-by-op compiles are cached per primitive and shape and shared between cases,
    # which on CPU is much cheaper than one jit compile per module and case.
    init_ours, init_ref, apply_ours, apply_ref = ours.init, ref.init, ours.apply, ref.apply
    v_ours, v_ref = init_ours(KEY, x), init_ref(KEY, x)

    # Same names, shapes, dtypes and values (same initialisers, same key).
    _same_tree(v_ours, v_ref)
    assert set(v_ours) == {"params"}
    expected_names = {"kernel", "bias"} if case["kw"].get("use_bias", True) else {"kernel"}
    assert set(v_ours["params"]) == expected_names
    for leaf in jax.tree_util.tree_leaves(v_ours):
        assert leaf.dtype == jnp.float32  # params stay float32 whatever the compute dtype

    y_ours, y_ref = apply_ours(v_ours, x), apply_ref(v_ref, x)
    assert y_ours.shape == y_ref.shape
    assert y_ours.dtype == y_ref.dtype == dtype
    _close(y_ours, y_ref, dtype)

    # Cross-loading: params made by one module (with another key) give the same outputs in the other.
    v_ref2, v_ours2 = init_ref(OTHER_KEY, x), init_ours(OTHER_KEY, x)
    assert not np.allclose(v_ref2["params"]["kernel"], v_ours["params"]["kernel"])
    _close(apply_ours(v_ref2, x), apply_ref(v_ref2, x), dtype)
    _close(apply_ref(v_ours2, x), apply_ours(v_ours2, x), dtype)

    # A non-zero bias is added the way flax adds it.
    if "bias" in v_ours["params"]:
        v_bias = jax.tree_util.tree_map(lambda p: jnp.asarray(np.asarray(p) + 0.5), v_ref2)
        _close(apply_ours(v_bias, x), apply_ref(v_bias, x), dtype)


GRAD_CASES = [p for p in ALL_CASES if p.id in {
    "dense-3d_BTD", "dense-no_bias", "dense-bf16", "conv-k3x5_stride2_valid", "conv-pad_pairs_stride2",
    "conv-dilation2", "conv-groups2", "conv-no_bias", "conv-unbatched_hwc", "conv-bf16_stride2_groups"}]


@pytest.mark.parametrize("kind, case", GRAD_CASES)
def test_gradients_match_flax(kind, case):
    ours, ref = _pair(kind, case["kw"])
    dtype = case["kw"].get("dtype", jnp.float32)
    x = _x(case["shape"])
    params = ref.init(KEY, x)["params"]
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(np.asarray(p) + 0.1), params)  # a non-zero bias too
    target = _x(ref.apply({"params": params}, x).shape, seed=3)

    def loss(module):
        def f(p, inp):
            y = module.apply({"params": p}, inp).astype(jnp.float32)
            return jnp.mean(jnp.sin(y) * target + y ** 2)
        return jax.value_and_grad(f, argnums=(0, 1))

    (l_ours, (gp_ours, gx_ours)), (l_ref, (gp_ref, gx_ref)) = loss(ours)(params, x), loss(ref)(params, x)
    _close(l_ours, l_ref, dtype)
    _same_tree(gp_ours, gp_ref, dtype)
    _close(gx_ours, gx_ref, dtype)
    assert float(jnp.abs(gx_ours).sum()) > 0 and all(
        float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(gp_ours))


@pytest.mark.parametrize("kind, case", [p for p in ALL_CASES if p.id in {"dense-2d", "conv-k3x5"}])
def test_params_match_flax_with_a_threefry_key(kind, case):
    """The rest of the file uses rbg keys for speed; the default (threefry) key gives equal params too."""
    ours, ref = _pair(kind, case["kw"])
    x = _x(case["shape"])
    key = jax.random.PRNGKey(3)
    _same_tree(ours.init(key, x), ref.init(key, x))


def test_conv_int_kernel_size_is_square():
    x = _x(NCHW)
    v = fnx.Conv(6, 3).init(KEY, x)
    assert v["params"]["kernel"].shape == (3, 3, 4, 6)


@pytest.mark.parametrize("kw, x_shape, words", [
    (dict(features=4, kernel_size=3, padding="CIRCULAR"), NCHW, ["CIRCULAR"]),
    (dict(features=4, kernel_size=(3, 3, 3)), NCHW, ["kernel_size"]),
    (dict(features=4, kernel_size=3, strides=(1, 1, 1)), NCHW, ["strides"]),
    (dict(features=4, kernel_size=3, feature_group_count=3), NCHW, ["feature_group_count=3"]),
    (dict(features=4, kernel_size=3), (2, 9, 10, 4, 1), ["NHWC"]),
])
def test_conv_rejects_bad_arguments(kw, x_shape, words):
    with pytest.raises(ValueError) as err:
        jax.eval_shape(fnx.Conv(**kw).init, KEY, jnp.zeros(x_shape))
    for w in words:
        assert w in str(err.value)


# --- backend resolution and dispatch --------------------------------------------------------------

def _ctx(factory, name):
    return contextlib.nullcontext() if name is None else factory(name)


def test_resolve_defaults_to_xla():
    assert fnx.resolve() == "xla"
    assert fnx.resolve(None) == "xla"
    assert B.resolve("pallas") == "pallas"


LEVELS = [None, "xla", "pallas", "auto"]


@pytest.mark.parametrize("default", LEVELS)
@pytest.mark.parametrize("override", LEVELS)
@pytest.mark.parametrize("module", LEVELS)
def test_resolve_order(module, override, default):
    expected = next((n for n in (module, override, default) if n is not None), "xla")
    with _ctx(fnx.default_backend, default), _ctx(fnx.use_backend, override):
        assert fnx.resolve(module) == expected
    # Nesting the other way round does not change the priority.
    with _ctx(fnx.use_backend, override), _ctx(fnx.default_backend, default):
        assert fnx.resolve(module) == expected
    assert fnx.resolve() == "xla"


@pytest.fixture
def recorder(monkeypatch):
    """Replaces the xla impls and a (fake) pallas impl of every op with wrappers of the xla impl that
    record (op, backend) per call. The real lazy kernel import is disabled so it cannot replace them."""
    calls = []
    monkeypatch.setattr(B, "_load_kernels", lambda: calls.append(("load_kernels", None)))

    def wrap(op, name, fn):
        def impl(*args, **kwargs):
            calls.append((op, name))
            return fn(*args, **kwargs)
        return impl

    for op in B.OPS:
        xla = B._IMPLS[op]["xla"]
        monkeypatch.setitem(B._IMPLS[op], "xla", wrap(op, "xla", xla))
        monkeypatch.setitem(B._IMPLS[op], "pallas", wrap(op, "pallas", xla))
    return calls


def _module_and_input(op, backend):
    if op == "matmul":
        return fnx.Dense(5, backend=backend), _x((3, 4))
    return fnx.Conv(5, 3, backend=backend), _x((2, 6, 6, 3))


@pytest.mark.parametrize("default", [None, "xla", "pallas"])
@pytest.mark.parametrize("override", [None, "xla", "pallas"])
@pytest.mark.parametrize("module", [None, "xla", "pallas"])
@pytest.mark.parametrize("op", B.OPS)
def test_dispatch_follows_resolution_order(recorder, op, module, override, default):
    expected = next((n for n in (module, override, default) if n is not None), "xla")
    layer, x = _module_and_input(op, module)
    params = layer.init(KEY, x)  # init dispatches too; only the apply below is checked
    ref_layer, _ = _module_and_input(op, "xla")
    want = ref_layer.apply(params, x)
    recorder.clear()
    with _ctx(fnx.default_backend, default), _ctx(fnx.use_backend, override):
        y = layer.apply(params, x)
    assert recorder == [(op, expected)]
    np.testing.assert_array_equal(y, want)


def test_jit_keeps_the_backend_it_was_traced_with(recorder):
    layer, x = _module_and_input("matmul", None)
    params = layer.init(KEY, x)
    f = jax.jit(layer.apply)
    recorder.clear()
    f(params, x)
    with fnx.use_backend("pallas"):
        f(params, x)  # cache hit: not traced again, still the xla trace
    assert recorder == [("matmul", "xla")]
    with fnx.use_backend("pallas"):
        jax.jit(lambda p, inp: layer.apply(p, inp))(params, x)  # a fresh function is traced under pallas
    assert recorder[-1] == ("matmul", "pallas")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="auto is always xla on CPU only")
@pytest.mark.parametrize("op", B.OPS)
def test_auto_on_cpu_is_xla(recorder, monkeypatch, op):
    # Even with a pallas kernel registered and a rule that always prefers it.
    monkeypatch.setitem(B._AUTO_RULES, op, lambda **_: True)
    layer, x = _module_and_input(op, "auto")
    params = layer.init(KEY, x)
    want = _module_and_input(op, "xla")[0].apply(params, x)
    recorder.clear()
    y = layer.apply(params, x)
    with fnx.use_backend("auto"):
        y2 = _module_and_input(op, None)[0].apply(params, x)
    assert recorder == [(op, "xla"), (op, "xla")]
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(y2, want)


@pytest.mark.parametrize("op", B.OPS)
@pytest.mark.parametrize("rule_says, registered, expected", [
    (True, True, "pallas"),
    (False, True, "xla"),
    (True, False, "xla"),
    (None, True, "xla"),  # no rule measured for this op
])
def test_auto_on_gpu_follows_the_tuning_rule(recorder, monkeypatch, op, rule_says, registered, expected):
    monkeypatch.setattr(B, "jax", types.SimpleNamespace(default_backend=lambda: "gpu"))
    seen = []
    if rule_says is not None:
        monkeypatch.setitem(B._AUTO_RULES, op, lambda **info: seen.append(info) or rule_says)
    else:
        monkeypatch.delitem(B._AUTO_RULES, op, raising=False)
    if not registered:
        monkeypatch.delitem(B._IMPLS[op], "pallas")
    layer, x = _module_and_input(op, "auto")
    params = _module_and_input(op, "xla")[0].init(KEY, x)
    recorder.clear()
    layer.apply(params, x)
    assert (op, expected) in recorder and recorder[-1] == (op, expected)
    assert ("load_kernels", None) in recorder  # auto on GPU tries to load the kernels
    if rule_says is not None and registered:
        kernel_shape = params["params"]["kernel"].shape
        assert seen and seen[-1]["shape"] == (x.shape, kernel_shape) and seen[-1]["dtype"] == x.dtype


@pytest.mark.parametrize("op", B.OPS)
@pytest.mark.parametrize("how", ["module", "use_backend", "default_backend"])
def test_pallas_without_kernel_raises_not_implemented(monkeypatch, op, how):
    loads = []
    monkeypatch.setattr(B, "_load_kernels", lambda: loads.append(1))
    monkeypatch.delitem(B._IMPLS[op], "pallas", raising=False)
    layer, x = _module_and_input(op, "pallas" if how == "module" else None)
    ctx = {"module": contextlib.nullcontext(), "use_backend": fnx.use_backend("pallas"),
           "default_backend": fnx.default_backend("pallas")}[how]
    with ctx, pytest.raises(NotImplementedError) as err:
        layer.init(KEY, x)
    assert op in str(err.value) and "pallas" in str(err.value)
    assert loads  # it tried to import the kernels before giving up


@pytest.mark.parametrize("bad", ["cuda", "XLA", "triton", ""])
def test_unknown_backend_raises_value_error_naming_choices(bad):
    def check(err):
        for name in fnx.BACKENDS:
            assert name in str(err.value)
        assert repr(bad) in str(err.value)

    for call in (lambda: fnx.resolve(bad), lambda: fnx.use_backend(bad).__enter__(),
                 lambda: fnx.default_backend(bad).__enter__(),
                 lambda: jax.eval_shape(fnx.Dense(3, backend=bad).init, KEY, jnp.ones((2, 4))),
                 lambda: jax.eval_shape(fnx.Conv(3, 3, backend=bad).init, KEY, jnp.ones((1, 4, 4, 2)))):
        with pytest.raises(ValueError) as err:
            call()
        check(err)
    assert fnx.resolve() == "xla"  # a failed enter left nothing behind


def test_backends_constant():
    assert set(fnx.BACKENDS) == {"xla", "pallas", "auto"}


def test_use_backend_nests_and_restores():
    assert fnx.resolve() == "xla"
    with fnx.use_backend("pallas"):
        assert fnx.resolve() == "pallas"
        with fnx.use_backend("auto"):
            assert fnx.resolve() == "auto"
            with fnx.use_backend("xla"):
                assert fnx.resolve() == "xla"
            assert fnx.resolve() == "auto"
        assert fnx.resolve() == "pallas"
    assert fnx.resolve() == "xla"


def test_use_backend_restores_after_exception():
    with fnx.default_backend("auto"):
        with fnx.use_backend("pallas"):
            with pytest.raises(RuntimeError):
                with fnx.use_backend("xla"):
                    assert fnx.resolve() == "xla"
                    raise RuntimeError("boom")
            assert fnx.resolve() == "pallas"
        assert fnx.resolve() == "auto"
        with pytest.raises(KeyError):
            with fnx.default_backend("pallas"):
                raise KeyError("x")
        assert fnx.resolve() == "auto"
    assert fnx.resolve() == "xla"


def test_default_backend_none_falls_through():
    with fnx.default_backend("pallas"):
        with fnx.default_backend(None):
            assert fnx.resolve() == "xla"
        assert fnx.resolve() == "pallas"
