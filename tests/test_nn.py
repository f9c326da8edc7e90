"""fastgpu_jax.nn: Dense / Conv against flax.linen, and the op-backend dispatch (module > use_backend >
default_backend > xla)."""

import contextlib
import dataclasses
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
    tol = 1e-2 if jnp.dtype(dtype).itemsize <= 2 else 1e-6
    as_np = np.complex128 if jnp.iscomplexobj(a) else np.float32
    np.testing.assert_allclose(np.asarray(a, as_np), np.asarray(b, as_np), rtol=tol, atol=tol)


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
    "f16": dict(shape=(3, 5), kw=dict(features=7, dtype=jnp.float16)),
    "unbatched": dict(shape=(5,), kw=dict(features=7)),
    "complex_input": dict(shape=(3, 5), x_dtype=jnp.complex64, kw=dict(features=7)),
    "complex_params": dict(shape=(3, 5), kw=dict(features=7, param_dtype=jnp.complex64)),
}

NCHW = (2, 9, 10, 4)  # odd spatial sizes make SAME/stride-2 padding asymmetric
K3 = (3, 3)
CONV_CASES = {
    "k1": dict(shape=NCHW, kw=dict(features=6, kernel_size=(1, 1))),
    "k3": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3)),
    "k3x5": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 5))),
    "k3_stride2": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3, strides=2)),
    "k3x5_stride_1x2": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 5), strides=(1, 2))),
    "k3x5_stride2_valid": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 5), strides=2, padding="VALID")),
    "valid": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3, padding="VALID")),
    "pad_int": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3, padding=1)),
    "pad_int2_stride2": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 5), strides=2, padding=2)),
    "pad_pairs": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3, padding=((1, 2), (0, 1)))),
    "pad_pairs_stride2": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 5), strides=2,
                                                  padding=((2, 0), (1, 3)))),
    "circular_stride2": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3, strides=2, padding="CIRCULAR")),
    "reflect": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 5), padding="REFLECT")),
    "dilation2": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3, kernel_dilation=2)),
    "dilation2_valid": dict(shape=NCHW, kw=dict(features=6, kernel_size=(3, 2), kernel_dilation=2,
                                                padding="VALID")),
    "input_dilation2": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3, input_dilation=2, padding=1)),
    "groups2": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3, feature_group_count=2)),
    "no_bias": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3, use_bias=False)),
    "mask": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3,
                                     mask=jnp.asarray(np.tril(np.ones((3, 3, 4, 6), np.float32))))),
    "unbatched_hwc": dict(shape=NCHW[1:], kw=dict(features=6, kernel_size=K3)),
    "unbatched_stride2": dict(shape=NCHW[1:], kw=dict(features=6, kernel_size=(3, 5), strides=2)),
    "extra_batch_dims": dict(shape=(2, 3, 7, 6, 4), kw=dict(features=6, kernel_size=K3)),
    "1d_int_kernel_size": dict(shape=(2, 9, 4), kw=dict(features=6, kernel_size=3)),
    "1d_causal_dilation2": dict(shape=(2, 9, 4), kw=dict(features=6, kernel_size=(3,), padding="CAUSAL",
                                                          kernel_dilation=2)),
    "3d": dict(shape=(2, 5, 6, 7, 4), kw=dict(features=6, kernel_size=(3, 3, 2), strides=(1, 2, 1))),
    "bf16": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3, dtype=jnp.bfloat16)),
    "bf16_stride2_groups": dict(shape=NCHW, kw=dict(features=6, kernel_size=K3, strides=2,
                                                    feature_group_count=2, dtype=jnp.bfloat16)),
    "complex_input": dict(shape=NCHW, x_dtype=jnp.complex64, kw=dict(features=6, kernel_size=K3)),
}


def _pair(kind, kw):
    """Ours and flax's layer from the same arguments: ours must read every one of them as flax does."""
    ours = (fnx.Dense if kind == "dense" else fnx.Conv)(**kw)
    ref = (fnn.Dense if kind == "dense" else fnn.Conv)(**kw)
    return ours, ref


ALL_CASES = ([pytest.param("dense", c, id=f"dense-{n}") for n, c in DENSE_CASES.items()]
             + [pytest.param("conv", c, id=f"conv-{n}") for n, c in CONV_CASES.items()])


@pytest.mark.parametrize("kind, case", ALL_CASES)
def test_params_and_outputs_match_flax(kind, case):
    ours, ref = _pair(kind, case["kw"])
    dtype = case["kw"].get("dtype", jnp.float32)
    x = _x(case["shape"], case.get("x_dtype", jnp.float32))
    # Eager on purpose: op-by-op compiles are cached per primitive and shape and shared between cases,
    # which on CPU is much cheaper than one jit compile per module and case.
    init_ours, init_ref, apply_ours, apply_ref = ours.init, ref.init, ours.apply, ref.apply
    v_ours, v_ref = init_ours(KEY, x), init_ref(KEY, x)

    # Same names, shapes, dtypes and values (same initialisers, same key).
    _same_tree(v_ours, v_ref)
    assert set(v_ours) == {"params"}
    expected_names = {"kernel", "bias"} if case["kw"].get("use_bias", True) else {"kernel"}
    assert set(v_ours["params"]) == expected_names
    for leaf in jax.tree_util.tree_leaves(v_ours):  # param_dtype whatever the compute dtype
        assert leaf.dtype == case["kw"].get("param_dtype", jnp.float32)

    y_ours, y_ref = apply_ours(v_ours, x), apply_ref(v_ref, x)
    assert y_ours.shape == y_ref.shape
    assert y_ours.dtype == y_ref.dtype
    assert "dtype" not in case["kw"] or y_ours.dtype == dtype
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


def test_conv_int_kernel_size_is_1d_as_in_flax():
    """An int kernel_size is a 1-D kernel (flax reads ``3`` as ``(3,)``), whatever the input rank."""
    x = _x((2, 9, 4))
    v = fnx.Conv(6, kernel_size=3).init(KEY, x)
    assert v["params"]["kernel"].shape == fnn.Conv(6, kernel_size=3).init(KEY, x)["params"]["kernel"].shape
    assert v["params"]["kernel"].shape == (3, 4, 6)
    x4 = _x(NCHW)  # (2, 9) are batch dims for a 1-D kernel
    y, v4 = fnx.Conv(6, kernel_size=3).init_with_output(KEY, x4)
    assert v4["params"]["kernel"].shape == (3, 4, 6) and y.shape == (2, 9, 10, 6)


def test_fields_and_auto_names_are_flaxs():
    for ours, theirs, extra in ((fnx.Dense, fnn.Dense, ["backend", "activation"]), (fnx.Conv, fnn.Conv, ["backend"])):
        assert issubclass(ours, theirs)
        names = [f.name for f in dataclasses.fields(ours)]
        assert names == [f.name for f in dataclasses.fields(theirs)][:-2] + extra + ["parent", "name"]

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnx.Dense(3)(fnx.Conv(4, (3, 3))(x).reshape(x.shape[0], -1))

    v = jax.eval_shape(Net().init, KEY, jnp.zeros((1, 5, 5, 2)))
    assert set(v["params"]) == {"Conv_0", "Dense_0"}


@pytest.mark.parametrize("kw, x_shape", [
    (dict(features=4, kernel_size=(3, 3), feature_group_count=3), NCHW),  # 4 channels, 3 groups
    (dict(features=4, kernel_size=(3, 3), padding="CAUSAL"), NCHW),  # CAUSAL is 1-D only
    (dict(features=4, kernel_size=(3, 3), padding=(1, 2, 3)), NCHW),  # 3 pads for 2 spatial dims
    (dict(features=4, kernel_size=(3, 3), mask=jnp.ones((3, 3, 4, 5))), NCHW),  # mask of the wrong shape
    (dict(features=4, kernel_size=(3, 3), padding="SIDEWAYS"), NCHW),
])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_conv_rejects_what_flax_rejects(kw, x_shape, backend):
    with pytest.raises(Exception) as theirs:
        jax.eval_shape(fnn.Conv(**kw).init, KEY, jnp.zeros(x_shape))
    with fnx.use_backend(backend), pytest.raises(type(theirs.value)):
        jax.eval_shape(fnx.Conv(**kw).init, KEY, jnp.zeros(x_shape))


# --- user-supplied ops and promote_dtype are used as in flax --------------------------------------

def _counting(fn, calls):
    def op(*args, **kwargs):
        calls.append(fn.__name__)
        return fn(*args, **kwargs)
    return op


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_a_user_supplied_op_is_used_and_not_dispatched(backend):
    calls = []
    dot, conv = _counting(jax.lax.dot_general, calls), _counting(jax.lax.conv_general_dilated, calls)
    dense_x, conv_x = _x((3, 4)), _x((2, 6, 6, 3))
    cases = [
        (fnx.Dense(5, dot_general=dot), fnn.Dense(5), dense_x),
        (fnx.Dense(5, dot_general_cls=lambda: dot), fnn.Dense(5), dense_x),
        (fnx.Conv(5, (3, 3), conv_general_dilated=conv), fnn.Conv(5, (3, 3)), conv_x),
        (fnx.Conv(5, (3, 3), conv_general_dilated_cls=lambda: conv), fnn.Conv(5, (3, 3)), conv_x),
    ]
    for ours, ref, x in cases:
        params = ref.init(KEY, x)
        calls.clear()
        with fnx.use_backend(backend), B.record_ops() as ops:
            y = ours.apply(params, x)
        assert len(calls) == 1 and ops == []  # the user's op ran, our dispatch saw nothing
        np.testing.assert_array_equal(y, ref.apply(params, x))


def test_promote_dtype_is_used():
    seen = []

    def promote(*args, dtype=None, inexact=True):
        seen.append(dtype)
        return [None if a is None else jnp.asarray(a, jnp.float32) for a in args]

    x = _x((2, 6, 6, 3))
    for layer in (fnx.Dense(5, promote_dtype=promote), fnx.Conv(5, (3, 3), promote_dtype=promote)):
        layer.init(KEY, x)
    assert len(seen) == 2


def test_clone_rebinds_the_backend():
    layer = fnx.Dense(5, backend="pallas")
    assert layer.dot_general == B.LayerOp(B.dot_general, "pallas")
    assert layer.clone(backend="xla").dot_general == B.LayerOp(B.dot_general, "xla")
    assert fnx.Conv(5, (3, 3)).conv_general_dilated == B.LayerOp(B.conv_general_dilated, None)
    assert hash(fnx.Dense(5)) == hash(fnx.Dense(5)) and fnx.Dense(5) == fnx.Dense(5)


# --- under pallas: what no kernel covers runs on XLA, recorded; what a kernel covers equals flax ----------

XLA_UNDER_PALLAS = {
    "dense-complex_input": (fnn.Dense, dict(features=5), (3, 4), jnp.complex64, "matmul", "complex64"),
    "dense-complex_params": (fnn.Dense, dict(features=5, param_dtype=jnp.complex64), (3, 4), jnp.float32,
                             "matmul", "complex64"),
    "dense-f16": (fnn.Dense, dict(features=5, dtype=jnp.float16), (3, 4), jnp.float32, "matmul", "float16"),
    "conv-1d": (fnn.Conv, dict(features=5, kernel_size=3), (2, 9, 3), jnp.float32, "conv_general_dilated",
                "1-D"),
    "conv-3d": (fnn.Conv, dict(features=5, kernel_size=(3, 3, 3)), (2, 5, 6, 7, 3), jnp.float32,
                "conv_general_dilated", "3-D"),
    "conv-input_dilation": (fnn.Conv, dict(features=5, kernel_size=(3, 3), input_dilation=2, padding=1),
                            (2, 6, 6, 3), jnp.float32, "conv_general_dilated", "input dilation"),
    "conv-groups": (fnn.Conv, dict(features=4, kernel_size=(3, 3), feature_group_count=2), (2, 6, 6, 4),
                    jnp.float32, "conv2d", "feature_group_count=2"),
    "conv-complex": (fnn.Conv, dict(features=5, kernel_size=(3, 3)), (2, 6, 6, 3), jnp.complex64, "conv2d",
                     "complex64"),
}


@pytest.mark.parametrize("flax_cls, kw, shape, x_dtype, op, reason", XLA_UNDER_PALLAS.values(),
                         ids=XLA_UNDER_PALLAS.keys())
def test_what_no_kernel_covers_runs_on_xla_under_pallas(monkeypatch, flax_cls, kw, shape, x_dtype, op, reason):
    loads = []
    monkeypatch.setattr(B, "_load_kernels", lambda: loads.append(1))  # an XLA call must not need them
    ours = (fnx.Dense if flax_cls is fnn.Dense else fnx.Conv)(**kw)
    x = _x(shape, x_dtype)
    v = flax_cls(**kw).init(KEY, x)
    want = flax_cls(**kw).apply(v, x)
    with fnx.use_backend("pallas"), B.record_ops() as calls:
        got = jax.jit(ours.apply)(v, x)
    assert [(o, b) for o, b, _ in calls] == [(op, "xla")]
    assert reason in calls[0][2]["xla_because"]
    assert not loads
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert got.dtype == want.dtype


KERNEL_CASES = {
    "dense-batch_dims": (fnn.Dense, dict(features=6), (2, 3, 5), "matmul"),
    "conv-stride2_dilation2": (fnn.Conv, dict(features=6, kernel_size=(3, 3), strides=2, kernel_dilation=2),
                               (2, 9, 10, 4), "conv2d"),
    "conv-circular_mask_extra_batch_dims": (fnn.Conv, dict(features=6, kernel_size=(3, 2), padding="CIRCULAR",
                                                           mask=jnp.asarray(np.tril(np.ones((3, 2, 4, 6))))),
                                            (2, 2, 7, 6, 4), "conv2d"),
    "conv-unbatched_reflect": (fnn.Conv, dict(features=6, kernel_size=(3, 3), padding="REFLECT"), (7, 6, 4),
                               "conv2d"),
}


@pytest.mark.parametrize("flax_cls, kw, shape, op", KERNEL_CASES.values(), ids=KERNEL_CASES.keys())
def test_what_a_kernel_covers_equals_flax_under_pallas(flax_cls, kw, shape, op):
    """The Pallas kernel (interpret mode on CPU) behind flax's own layer logic: same params, same outputs."""
    ours, ref = (fnx.Dense if flax_cls is fnn.Dense else fnx.Conv)(**kw), flax_cls(**kw)
    x = _x(shape)
    with fnx.use_backend("pallas"), B.record_ops() as calls:
        y, v_ours = ours.init_with_output(KEY, x)
    want, v_ref = ref.init_with_output(KEY, x)
    assert [(o, b) for o, b, _ in calls] == [(op, "pallas")]
    _same_tree(v_ours, v_ref)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert y.shape == want.shape and y.dtype == want.dtype


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
    return fnx.Conv(5, (3, 3), backend=backend), _x((2, 6, 6, 3))


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
                 lambda: jax.eval_shape(fnx.Conv(3, (3, 3), backend=bad).init, KEY, jnp.ones((1, 4, 4, 2))),
                 lambda: jax.eval_shape(fnx.Conv(3, 3, backend=bad).init, KEY, jnp.ones((1, 4, 2)))):
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


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_exact"])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_dense_activation_is_flax_dense_then_the_activation(activation, backend):
    """``Dense(n, activation=a)`` has flax Dense's params and equals ``a(flax Dense(x))``, values and grads;
    on pallas the bias and activation run in the matmul kernel's epilogue (one fused kernel call)."""
    act = {"relu": fnn.relu, "gelu": fnn.gelu, "gelu_exact": lambda y: fnn.gelu(y, approximate=False)}[activation]
    x = _x((3, 5, 12))
    ours, ref = fnx.Dense(20, activation=activation, backend=backend), fnn.Dense(20)
    params = ours.init(KEY, x)
    _same_tree(params, ref.init(KEY, x))
    with B.record_ops() as calls:
        y = ours.apply(params, x)
    assert [(op, name, info.get("epilogue")) for op, name, info in calls] == [("matmul", backend, (True, activation))]
    np.testing.assert_allclose(y, act(ref.apply(params, x)), rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p)))  # noqa: E731
    got = jax.grad(loss(lambda p: ours.apply(p, x)))(params)
    want = jax.grad(loss(lambda p: act(ref.apply(p, x))))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_dense_activation_with_a_precision_runs_flax_dense_then_the_activation():
    x = _x((4, 6))
    ours = fnx.Dense(3, activation="relu", precision="highest", backend="pallas")
    params = ours.init(KEY, x)
    with B.record_ops() as calls:
        y = ours.apply(params, x)
    # flax's own Dense path (it passes the precision to dot_general), then the activation: no fused epilogue
    assert [(name, info.get("epilogue")) for _, name, info in calls] == [("pallas", None)]
    np.testing.assert_allclose(y, fnn.relu(fnn.Dense(3, precision="highest").apply(params, x)), rtol=1e-6)


def test_dense_rejects_an_unknown_activation():
    with pytest.raises(ValueError, match="activation 'tanh' is unknown"):
        fnx.Dense(3, activation="tanh").init(KEY, _x((2, 4)))
