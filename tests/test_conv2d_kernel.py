"""The Pallas conv2d kernels (CPU interpret mode) against lax.conv_general_dilated, and their CUDA lowering.

Shapes are small and deliberately not block multiples, so the padding/slicing glue is exercised too.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fastgpu_jax.pallas_kernels import lowering, tuning
from fastgpu_jax.pallas_kernels.conv2d import conv2d

# The package re-exports the functions under the module names, so fetch the modules themselves.
conv_mod = importlib.import_module("fastgpu_jax.pallas_kernels.conv2d")

DN = ("NHWC", "HWIO", "NHWC")


def ref_conv(x, w, *, strides=(1, 1), padding="SAME", dilation=(1, 1), feature_group_count=1):
    return lax.conv_general_dilated(x, w, window_strides=strides, padding=padding, rhs_dilation=dilation,
                                    dimension_numbers=DN, feature_group_count=feature_group_count,
                                    precision=lax.Precision.HIGHEST)


def make(x_shape, w_shape, dtype=jnp.float32, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kx, x_shape, jnp.float32).astype(dtype),
            jax.random.normal(kw, w_shape, jnp.float32).astype(dtype))


# On a GPU, float32 dots run in TF32 (10-bit mantissa, as XLA's do by default): a relative error of ~1e-3 per
# product, so float32 results are held to 5e-3 there; the interpreter on CPU computes in full float32.
GPU_F32_REL = 5e-3 if jax.default_backend() == "gpu" else 0.0


def assert_close(got, want, rel):
    rel = max(rel, GPU_F32_REL)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * max(1.0, float(np.abs(want).max())))


# (x shape, w shape, conv kwargs): kernel sizes 1, 3, (3, 2), 5; strides 1, 2, (2, 1); all paddings; dilation.
FORWARD_CASES = [
    ((2, 7, 7, 5), (3, 3, 5, 7), dict()),
    ((2, 8, 8, 3), (3, 3, 3, 20), dict(padding="VALID")),
    ((2, 9, 8, 5), (3, 3, 5, 6), dict(strides=(2, 2))),
    ((2, 9, 9, 4), (3, 3, 4, 6), dict(strides=(2, 2), padding="VALID")),
    ((2, 9, 7, 4), (3, 3, 4, 5), dict(strides=(2, 1), padding=((1, 2), (0, 1)))),
    ((2, 7, 8, 6), (3, 2, 6, 5), dict()),
    ((2, 8, 7, 3), (3, 2, 3, 17), dict(strides=(2, 2), padding=((2, 0), (1, 3)))),
    ((2, 9, 8, 4), (3, 3, 4, 6), dict(dilation=(2, 2))),
    ((2, 9, 9, 4), (3, 3, 4, 6), dict(dilation=(2, 1), strides=(2, 2), padding="VALID")),
    ((2, 9, 7, 4), (5, 5, 4, 3), dict(strides=(2, 2), padding=((2, 1), (0, 3)))),
    ((2, 6, 7, 5), (3, 3, 5, 4), dict(padding=((-1, 2), (3, -1)))),
    ((2, 7, 6, 5), (1, 1, 5, 9), dict()),
    ((2, 7, 6, 5), (1, 1, 5, 9), dict(strides=(2, 2), padding=((1, 0), (0, 2)))),
]


@pytest.fixture
def gemm_for_few_channels(monkeypatch):
    """The cases below have 3-6 input channels to stay fast; run them on the implicit-GEMM kernel anyway
    (by default few-channel convs are unfolded into a matmul: ``test_routes_forward_and_gradients``)."""
    monkeypatch.setattr(conv_mod, "GATHER_MIN_CIN", 1)


def _id(case):
    x_shape, w_shape, kwargs = case
    return f"k{w_shape[0]}x{w_shape[1]}-" + "-".join(f"{k}{v}" for k, v in kwargs.items()).replace(" ", "")


@pytest.mark.parametrize("case", FORWARD_CASES, ids=_id)
def test_forward_f32_matches_lax(case, gemm_for_few_channels):
    x_shape, w_shape, kwargs = case
    x, w = make(x_shape, w_shape)
    y = conv2d(x, w, **kwargs)
    assert y.dtype == jnp.float32
    assert_close(y, ref_conv(x, w, **kwargs), 1e-5)


@pytest.mark.parametrize("case", [FORWARD_CASES[0], FORWARD_CASES[2], FORWARD_CASES[11]], ids=_id)
def test_forward_bf16_matches_lax(case, gemm_for_few_channels):
    x_shape, w_shape, kwargs = case
    x, w = make(x_shape, w_shape, jnp.bfloat16)
    y = conv2d(x, w, **kwargs)
    assert y.dtype == jnp.bfloat16
    want = ref_conv(x.astype(jnp.float32), w.astype(jnp.float32), **kwargs)
    assert_close(y, want, 2e-2)
    y32 = conv2d(x, w, preferred_element_type=jnp.float32, **kwargs)
    assert y32.dtype == jnp.float32
    assert_close(y32, want, 1e-3)


GRAD_CASES = [
    ((2, 7, 7, 5), (3, 3, 5, 7), dict()),
    ((2, 9, 8, 5), (3, 3, 5, 6), dict(strides=(2, 2))),
    ((2, 9, 9, 4), (3, 2, 4, 6), dict(strides=(2, 1), padding="VALID")),
    ((2, 9, 8, 4), (3, 3, 4, 6), dict(dilation=(2, 2), padding=((1, 3), (4, 0)))),
    ((2, 9, 7, 4), (3, 3, 4, 3), dict(strides=(2, 2), dilation=(2, 2), padding=((3, 3), (-1, 2)))),
    ((2, 7, 6, 5), (1, 1, 5, 9), dict(strides=(2, 2))),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=_id)
def test_gradients_match_lax(case, gemm_for_few_channels):
    x_shape, w_shape, kwargs = case
    x, w = make(x_shape, w_shape, seed=1)
    cot = jax.random.normal(jax.random.key(2), ref_conv(x, w, **kwargs).shape)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w, **kwargs) * cot)

    dx, dw = jax.jit(jax.grad(loss(conv2d), (0, 1)))(x, w)
    rx, rw = jax.grad(loss(ref_conv), (0, 1))(x, w)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert_close(dx, rx, 1e-5)
    assert_close(dw, rw, 1e-5)


def test_bf16_gradients_match_lax(gemm_for_few_channels):
    x, w = make((2, 8, 7, 6), (3, 3, 6, 5), jnp.bfloat16, seed=3)
    kwargs = dict(strides=(2, 2))
    cot = jax.random.normal(jax.random.key(4), ref_conv(x, w, **kwargs).shape, jnp.bfloat16)
    _, vjp = jax.vjp(lambda x, w: conv2d(x, w, **kwargs), x, w)
    dx, dw = vjp(cot)
    f32 = [a.astype(jnp.float32) for a in (x, w, cot)]
    _, ref_vjp = jax.vjp(lambda x, w: ref_conv(x, w, **kwargs), f32[0], f32[1])
    rx, rw = ref_vjp(f32[2])
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    assert_close(dx, rx, 3e-2)
    assert_close(dw, rw, 3e-2)


def test_pointwise_conv_runs_on_the_matmul_kernel(monkeypatch):
    matmul_mod = importlib.import_module("fastgpu_jax.pallas_kernels.matmul")
    calls = []
    real = matmul_mod.matmul

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(conv_mod, "matmul", spy)
    x, w = make((2, 7, 6, 5), (1, 1, 5, 9))
    y = conv2d(x, w, strides=(2, 2), padding="VALID")
    assert calls == [(2, 4, 3, 5)]
    assert_close(y, ref_conv(x, w, strides=(2, 2), padding="VALID"), 1e-5)


def test_grouped_conv_falls_back_to_lax():
    x, w = make((2, 7, 7, 6), (3, 3, 2, 9))
    kwargs = dict(strides=(2, 2), padding="SAME", feature_group_count=3)
    assert_close(conv2d(x, w, **kwargs), ref_conv(x, w, **kwargs), 1e-5)
    dx, dw = jax.grad(lambda x, w: jnp.sum(conv2d(x, w, **kwargs) ** 2), (0, 1))(x, w)
    rx, rw = jax.grad(lambda x, w: jnp.sum(ref_conv(x, w, **kwargs) ** 2), (0, 1))(x, w)
    assert_close(dx, rx, 1e-5)
    assert_close(dw, rw, 1e-5)


def test_explicit_blocks_and_wgrad_pixel_splits(monkeypatch):
    """Several pixel, input- and output-channel blocks; wgrad split over pixel ranges (uneven last split)."""
    mm = importlib.import_module("fastgpu_jax.pallas_kernels.matmul")
    monkeypatch.setattr(mm, "SPLIT_TARGET", 200)
    monkeypatch.setattr(mm, "MIN_SPLIT_STEPS", 2)
    x, w = make((3, 5, 37, 20), (3, 3, 20, 33), seed=5)
    blocks = tuning.ConvBlocks(block_m=32, block_n=16, block_k=16)
    # 9 taps x 2 Cin blocks x 3 Cout blocks = 54 tiles; 555 pixels in 18 blocks of 32 -> 4 splits of 5, 5, 5, 3
    assert mm.splits_for(54, 18) == (4, 5)
    kwargs = dict(strides=(1, 1), padding="SAME")
    cot = jax.random.normal(jax.random.key(6), ref_conv(x, w, **kwargs).shape)
    y, vjp = jax.vjp(lambda x, w: conv2d(x, w, blocks=blocks, **kwargs), x, w)
    ry, ref_vjp = jax.vjp(lambda x, w: ref_conv(x, w, **kwargs), x, w)
    assert_close(y, ry, 1e-5)
    for got, want in zip(vjp(cot), ref_vjp(cot)):
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("x_shape, w_shape, kwargs, route", [
    ((2, 16, 16, 3), (4, 4, 3, 8), dict(strides=(4, 4), padding="VALID"), "patchify"),
    ((2, 18, 17, 5), (4, 4, 5, 8), dict(strides=(4, 4), padding="VALID"), "patchify"),
    ((2, 11, 11, 3), (5, 5, 3, 16), dict(strides=(2, 2), padding=((2, 2), (2, 2))), "unfold"),
    ((2, 9, 9, 16), (3, 3, 16, 16), dict(strides=(2, 2), padding="SAME"), "implicit_gemm"),
])
def test_routes_forward_and_gradients(x_shape, w_shape, kwargs, route):
    """Patch embeddings and few-channel stems run on the matmul; all routes agree with lax, with grads."""
    x, w = make(x_shape, w_shape, seed=7)
    pads = conv_mod._explicit_pads(x_shape[1:3], w_shape[:2], kwargs["strides"], (1, 1), kwargs["padding"])
    assert conv_mod.route(x_shape, w_shape, kwargs["strides"], pads, (1, 1)) == route
    cot = jax.random.normal(jax.random.key(8), ref_conv(x, w, **kwargs).shape)
    y, vjp = jax.vjp(lambda x, w: conv2d(x, w, **kwargs), x, w)
    ry, ref_vjp = jax.vjp(lambda x, w: ref_conv(x, w, **kwargs), x, w)
    assert_close(y, ry, 1e-5)
    for got, want in zip(vjp(cot), ref_vjp(cot)):
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("size, k, s, lo", [(9, 3, 2, 1), (8, 3, 2, 0), (7, 1, 2, 0), (10, 5, 3, 2), (9, 4, 2, 1)])
def test_sub_pixel_phases_cover_every_tap_once(size, k, s, lo):
    """Each kernel tap belongs to exactly one phase; phase lengths add up to the input size."""
    out = (size + 2 * lo - k) // s + 1
    phases = [conv_mod._phase_taps(a, size, k, s, lo, out) for a in range(s)]
    assert sorted(t for taps, _, _ in phases for t in taps) == list(range(k))
    assert sum(length for _, _, length in phases) == size


def test_rejects_mismatched_channels():
    x, w = make((1, 5, 5, 4), (3, 3, 3, 2))
    with pytest.raises(ValueError, match="channels"):
        conv2d(x, w)


CONV_ENTRIES = sorted({(key[3], b) for key, b in tuning.TABLE.items() if key[1] == "conv2d"},
                      key=lambda e: (e[0], tuple(vars(e[1]).values())))


@pytest.mark.parametrize("entry", CONV_ENTRIES, ids=lambda e: "{}-m{}n{}k{}".format(
    e[0], e[1].block_m, e[1].block_n, e[1].block_k))
def test_kernels_lower_for_cuda(entry):
    """Forward, dgrad and wgrad with interpret=False lower through the Triton path (no GPU needed)."""
    dtype, blocks = entry
    for dtype in (jnp.dtype(dtype),):
        for strides in ((1, 1), (2, 2)):
            def f(x, w, strides=strides):
                conv = lambda x, w: conv2d(x, w, strides=strides, padding="SAME", blocks=blocks,  # noqa: E731
                                           interpret=False)
                y, vjp = jax.vjp(conv, x, w)
                return y, vjp(y)

            args = (jax.ShapeDtypeStruct((8, 16, 64, 64), dtype), jax.ShapeDtypeStruct((3, 3, 64, 128), dtype))
            with lowering.lower_for_gpu():
                text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("conv2d_fwd") >= 2 and "conv2d_wgrad" in text
