"""The conv's Mosaic GPU body (``conv_mgpu.py``), without a GPU.

* Its phased HWNC layout is checked against direct NHWC indexing: every tap of every output pixel reads the
  input pixel ``lax.conv`` would, and every TMA box starts on a tile row.
* It runs in the Mosaic GPU interpreter against ``lax.conv_general_dilated`` and ``jax.grad`` (forward, input
  gradient through the sub-pixel phases, weight gradient with split-K), strided, dilated, odd shapes.
* Every H100 tuning entry lowers for CUDA from CPU, forward and backward, bf16 and f32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fastgpu_jax.pallas_kernels import conv_mgpu, lowering, tuning
from fastgpu_jax.pallas_kernels.conv2d import conv2d

on_cpu = jax.default_backend() == "cpu"
pytestmark = pytest.mark.usefixtures("no_mosaic_races")  # interpreted kernels must not race
needs_interpreter = pytest.mark.skipif(
    on_cpu and lowering.mosaic_interpreter() is None,
    reason=lowering.MOSAIC_INTERPRETER_MISSING.format(jax.__version__))
F32_TOL = 5e-3 if jax.default_backend() == "gpu" else 1e-5  # TF32 on a GPU


def _reference(x, w, strides, padding, dilation):
    return lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), strides, padding,
                                    rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision="highest")


def _inputs(x_shape, w_shape, dtype, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, x_shape, jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, w_shape, jnp.float32) / np.sqrt(np.prod(w_shape[:3]))).astype(dtype)
    return x, w


@pytest.mark.parametrize("strides,pads,dilation", [((1, 1), ((1, 1), (1, 1)), (1, 1)),
                                                   ((2, 3), ((1, 0), (2, 1)), (1, 1)),
                                                   ((2, 2), ((0, 2), (1, 1)), (2, 1))])
def test_layout_reads_what_lax_conv_reads_and_boxes_start_on_tile_rows(strides, pads, dilation):
    n, h, w_, kh, kw = 3, 11, 9, 3, 2
    x = np.arange(n * h * w_, dtype=np.float32).reshape(n, h, w_, 1) + 1  # every pixel distinct and nonzero
    for align in (8, 32):
        lay = conv_mgpu.layout(x.shape, (kh, kw, 1, 1), strides, pads, dilation, align)
        assert lay.nb % align == 0 and all(o % align == 0 for o in lay.offsets)  # TMA boxes on tile rows
        rows = np.asarray(conv_mgpu._rows(jnp.asarray(x), lay, strides, pads, 1, lay.virtual + lay.span))[:, 0]
        xp = np.pad(x[..., 0], ((0, 0), pads[0], pads[1]))
        (oh, ow), wq = lay.out_hw, lay.grid[1]
        assert (oh, ow) == _reference(x, np.ones((kh, kw, 1, 1), np.float32), strides, pads, dilation).shape[1:3]
        for t, off in enumerate(lay.offsets):
            i, j = divmod(t, kw)
            got = rows[np.arange(lay.virtual) + off].reshape(oh, wq, lay.nb)[:, :ow, :n].transpose(2, 0, 1)
            want = xp[:, i * dilation[0]::strides[0], j * dilation[1]::strides[1]][:, :oh, :ow]
            np.testing.assert_array_equal(got, want, err_msg=f"tap {t}")


@needs_interpreter
@pytest.mark.parametrize("x_shape,w_shape,strides,padding,dilation", [
    ((2, 7, 6, 20), (3, 3, 20, 24), (1, 1), "SAME", (1, 1)),
    ((3, 9, 8, 17), (3, 2, 17, 40), (2, 2), ((1, 0), (2, 1)), (1, 1)),  # four sub-pixel dgrad phases
], ids=["3x3-same", "strided-asymmetric"])
def test_forward_and_gradients_f32_match_lax(x_shape, w_shape, strides, padding, dilation):
    x, w = _inputs(x_shape, w_shape, jnp.float32, seed=1)
    ref = _reference(x, w, strides, padding, dilation)
    weights = jnp.cos(jnp.arange(ref.size, dtype=jnp.float32)).reshape(ref.shape)

    with lowering.use_lowering("mosaic"), lowering.record_launches() as rows:  # one forward for y and the vjp
        y, vjp = jax.vjp(lambda x, w: conv2d(x, w, strides=strides, padding=padding, dilation=dilation), x, w)
        got = vjp(weights)  # the gradients of (conv * weights).sum()
    assert {r["name"] for r in rows} == {"conv2d_fwd_mgpu", "conv2d_wgrad_mgpu"}
    np.testing.assert_allclose(y, ref, rtol=F32_TOL, atol=F32_TOL)
    want = jax.grad(lambda x, w: (_reference(x, w, strides, padding, dilation) * weights).sum(), argnums=(0, 1))(x, w)
    for name, g, r in zip(("dx", "dw"), got, want):
        np.testing.assert_allclose(g, r, rtol=F32_TOL, atol=F32_TOL * float(jnp.abs(r).max()), err_msg=name)


@needs_interpreter
def test_dilated_bf16_forward_matches_lax_and_the_triton_body():
    x, w = _inputs((2, 9, 9, 16), (3, 3, 16, 16), jnp.bfloat16, seed=2)
    with lowering.use_lowering("mosaic"), lowering.record_launches() as rows:
        y = conv2d(x, w, padding="VALID", dilation=2)
    assert [r["lowering"] for r in rows] == ["mosaic"]
    triton = conv2d(x, w, padding="VALID", dilation=2)  # auto on CPU: the Triton interpreter
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, 5, 16)
    ref = _reference(x, w, (1, 1), "VALID", (2, 2))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=3e-2)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(triton, np.float32), rtol=2e-2, atol=3e-2)


# --- lowering for an H100 from this CPU machine --------------------------------------------------------

_SHAPES = {"large": ((32, 28, 28, 128), (3, 3, 128, 256), 1), "medium": ((32, 56, 56, 64), (3, 3, 64, 64), 1),
           "small": ((8, 20, 20, 16), (3, 3, 16, 24), 2)}
_H100 = sorted(key for key in tuning.TABLE if key[:2] == ("H100", "conv2d_mgpu"))


@pytest.mark.parametrize("key", _H100, ids=lambda k: f"{k[2]}-{k[3]}")
def test_every_h100_entry_lowers_forward_and_backward_for_cuda(key):
    _, _, shape_class, dtype_name = key
    x_shape, w_shape, stride = _SHAPES[shape_class]
    assert tuning.conv_shape_class(*w_shape[2:]) == shape_class
    dtype = jnp.dtype(dtype_name)

    def train(x, w):
        return jax.grad(lambda x, w: conv2d(x, w, strides=stride).astype(jnp.float32).sum(), argnums=(0, 1))(x, w)

    with lowering.lower_for_gpu(), tuning.use_device_kind("H100"), lowering.record_launches() as rows:
        text = jax.jit(train).trace(jax.ShapeDtypeStruct(x_shape, dtype), jax.ShapeDtypeStruct(w_shape, dtype)) \
            .lower(lowering_platforms=("cuda",)).as_text()
    names = [r["name"] for r in rows]  # auto on an H100: Mosaic GPU
    assert names[0] == "conv2d_fwd_mgpu" and names[-1] == "conv2d_wgrad_mgpu"
    assert len(names) == (2 if stride == 1 else 1 + stride * stride) + 1 and text.count("mosaic_gpu") >= len(names)
    assert all(r["macs"][1] >= r["macs"][0] for r in rows)


def test_measured_triton_win_keeps_the_conv_on_triton(monkeypatch):
    monkeypatch.setitem(tuning.TRITON_FASTER_THAN_MOSAIC, ("H100", "conv2d", "large"), True)
    x, w = jax.ShapeDtypeStruct((8, 14, 14, 128), jnp.bfloat16), jax.ShapeDtypeStruct((3, 3, 128, 128), jnp.bfloat16)
    with lowering.lower_for_gpu(), tuning.use_device_kind("H100"), lowering.record_launches() as rows:
        jax.jit(lambda x, w: conv2d(x, w)).trace(x, w).lower(lowering_platforms=("cuda",))
    assert [(r["name"], r["lowering"]) for r in rows] == [("conv2d_fwd", "triton")]


def test_64_output_channels_fill_the_tile_on_the_forward():
    """Cout = 64 (ResNet-50's first stage): the forward's warpgroups own 32 columns each (the weights read
    (Cout, K)), not 64 with half wasted; bfloat16's weight gradient reads dy as stored and keeps 64."""
    x, w = jax.ShapeDtypeStruct((32, 56, 56, 64), jnp.bfloat16), jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.bfloat16)
    with lowering.lower_for_gpu(), tuning.use_device_kind("H100"), lowering.record_launches() as rows:
        jax.jit(jax.grad(lambda x, w: conv2d(x, w).astype(jnp.float32).sum(), argnums=(0, 1))).trace(x, w) \
            .lower(lowering_platforms=("cuda",))
    waste = {r["name"]: r["macs"][1] / r["macs"][0] for r in rows}
    assert waste["conv2d_fwd_mgpu"] < 1.05  # the virtual columns: 58/56
    assert 2 < waste["conv2d_wgrad_mgpu"] < 2.2  # recorded as a known cost (BENCHMARKS.md)


@needs_interpreter
def test_split_k_forward_and_weight_gradient_match_lax(monkeypatch):
    """With more CTAs than output tiles, both GEMMs split their reduction (the forward over taps, the weight
    gradient over pixels) into float32 partials summed by XLA."""
    from fastgpu_jax.pallas_kernels import matmul_mgpu

    monkeypatch.setattr(lowering, "num_sms", lambda kind, interpret: 4)
    splits = []
    split_k = matmul_mgpu.split_k
    monkeypatch.setattr(conv_mgpu, "split_k", lambda *a: splits.append(split_k(*a)[0]) or split_k(*a))
    x, w = _inputs((1, 3, 3, 16), (1, 3, 16, 24), jnp.float32, seed=3)  # one output tile, three taps
    ref = _reference(x, w, (1, 1), "SAME", (1, 1))
    weights = jnp.sin(jnp.arange(ref.size, dtype=jnp.float32)).reshape(ref.shape)
    with lowering.use_lowering("mosaic"):
        y, vjp = jax.vjp(lambda w: conv2d(x, w), w)
        (dw,) = vjp(weights)
    assert len(splits) == 2 and min(splits) > 1, splits  # forward (3 taps), weight gradient (3 tiles, 4 CTAs)
    np.testing.assert_allclose(y, ref, rtol=F32_TOL, atol=F32_TOL)
    want = jax.grad(lambda w: (_reference(x, w, (1, 1), "SAME", (1, 1)) * weights).sum())(w)
    np.testing.assert_allclose(dw, want, rtol=F32_TOL, atol=F32_TOL * float(jnp.abs(want).max()))
