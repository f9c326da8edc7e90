"""The matmul's Mosaic GPU body, without a GPU.

* It runs in the Mosaic GPU interpreter (simulated warpgroups, TMA copies, barriers and wgmma on CPU) against
  ``jnp``/``jax.grad`` and against the Triton body: forward with the fused epilogue, gradients, split-K, odd shapes.
  The interpreter's wgmma has no transposed shared-memory views, so there the backward's transposes are XLA's.
* It lowers for CUDA from CPU for every H100 tuning entry, forward and backward (the transposed views included):
  Mosaic GPU's lowering lays out every register array and checks shared memory against the H100's 227 KB.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastgpu_jax.pallas_kernels import lowering, tuning
from fastgpu_jax.pallas_kernels.matmul import matmul

on_cpu = jax.default_backend() == "cpu"
pytestmark = pytest.mark.usefixtures("no_mosaic_races")  # interpreted kernels must not race
needs_interpreter = pytest.mark.skipif(  # on a GPU these run the real kernel
    on_cpu and lowering.mosaic_interpreter() is None,
    reason=lowering.MOSAIC_INTERPRETER_MISSING.format(jax.__version__))


# float32 runs as TF32 on a GPU (where these tests run the real kernel): 5e-3 there, full float32 interpreted.
F32_TOL = 5e-3 if jax.default_backend() == "gpu" else 1e-5


def _inputs(shape_a, shape_b, dtype, seed=0):
    ka, kb, kc = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.normal(ka, shape_a, jnp.float32).astype(dtype)
    b = (jax.random.normal(kb, shape_b, jnp.float32) / np.sqrt(shape_b[0])).astype(dtype)
    bias = jax.random.normal(kc, (shape_b[1],), jnp.float32).astype(dtype)
    return a, b, bias


def _reference(a, b, bias, activation):
    z = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest") + bias.astype(jnp.float32)
    return {"relu": jax.nn.relu, "gelu": lambda v: jax.nn.gelu(v, approximate=True),
            "gelu_exact": lambda v: jax.nn.gelu(v, approximate=False), None: lambda v: v}[activation](z)


@needs_interpreter
def test_forward_bf16_with_bias_and_relu_matches_jnp_and_the_triton_body():
    a, b, bias = _inputs((3, 37, 70), (70, 90), jnp.bfloat16)  # M = 111, nothing a tile multiple
    with lowering.use_lowering("mosaic"), lowering.record_launches() as rows:
        y = matmul(a, b, bias, "relu")
    assert [r["lowering"] for r in rows] == ["mosaic"]
    triton = matmul(a, b, bias, "relu")  # auto on CPU: the Triton interpreter
    assert y.dtype == jnp.bfloat16 and y.shape == (3, 37, 90)
    ref = _reference(a, b, bias, "relu")
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=1e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(triton, np.float32), rtol=1e-2, atol=2e-2)


@needs_interpreter
def test_gradients_f32_gelu_exact_match_jax_grad():
    a, b, bias = _inputs((45, 50), (50, 70), jnp.float32, seed=1)
    weights = jnp.cos(jnp.arange(45 * 70, dtype=jnp.float32)).reshape(45, 70)

    def loss(fn):
        return lambda a, b, bias: (fn(a, b, bias) * weights).sum()

    with lowering.use_lowering("mosaic"), lowering.record_launches() as rows:
        got = jax.grad(loss(lambda a, b, c: matmul(a, b, c, "gelu_exact")), argnums=(0, 1, 2))(a, b, bias)
    assert [r["lowering"] for r in rows] == ["mosaic"] * 3  # forward, dA, dB
    want = jax.grad(loss(lambda a, b, c: _reference(a, b, c, "gelu_exact")), argnums=(0, 1, 2))(a, b, bias)
    for name, g, w in zip(("da", "db", "dbias"), got, want):
        np.testing.assert_allclose(g, w, rtol=F32_TOL, atol=F32_TOL * float(jnp.abs(w).max()), err_msg=name)


@needs_interpreter
def test_split_k_sums_partials_then_applies_bias_and_gelu():
    a, b, bias = _inputs((40, 700), (700, 60), jnp.bfloat16, seed=2)  # one output tile, a long reduction
    with lowering.use_lowering("mosaic"), lowering.record_launches() as rows:
        y = matmul(a, b, bias, "gelu", out_dtype=jnp.float32)
    useful, executed = rows[0]["macs"]
    assert executed >= useful and rows[0]["grid"] == [lowering.num_sms(tuning.device_kind(), interpret=on_cpu)]
    np.testing.assert_allclose(y, _reference(a, b, bias, "gelu"), rtol=1e-4, atol=1e-4)


# --- lowering for an H100 from this CPU machine --------------------------------------------------------

_SHAPES = {"large": (2048, 1024, 2048), "medium": (512, 384, 640), "small": (96, 80, 72)}  # (m, k, n)
_H100 = sorted(key for key in tuning.TABLE if key[:2] == ("H100", "matmul_mgpu"))


def _lower(fn, *shapes):
    with lowering.lower_for_gpu(), tuning.use_device_kind("H100"), lowering.record_launches() as rows:
        text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    return text, rows


@pytest.mark.parametrize("key", _H100, ids=lambda k: f"{k[2]}-{k[3]}")
def test_every_h100_entry_lowers_forward_and_backward_for_cuda(key):
    _, _, shape_class, dtype_name = key
    m, k, n = _SHAPES[shape_class]
    dtype = jnp.dtype(dtype_name)
    assert tuning.matmul_shape_class(m, n, k) == shape_class
    args = [jax.ShapeDtypeStruct(s, dtype) for s in ((m, k), (k, n), (n,))]

    def train(a, b, bias):
        return jax.grad(lambda a, b, bias: matmul(a, b, bias, "gelu").astype(jnp.float32).sum(),
                        argnums=(0, 1, 2))(a, b, bias)

    text, rows = _lower(train, *args)
    assert text.count("mosaic_gpu") >= 3, "forward, dA and dB are Mosaic GPU kernels"
    assert [r["lowering"] for r in rows] == ["mosaic"] * 3


def test_a_tile_too_big_for_shared_memory_fails_to_lower():
    big = tuning.MosaicMatmulBlocks(tile_m=128, tile_n=256, tile_k=128, stages=4)
    a = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        _lower(lambda a, b: matmul(a, b, blocks=big), a, a)
    fits = dataclasses.replace(big, tile_n=128, tile_k=64)
    _lower(lambda a, b: matmul(a, b, blocks=fits), a, a)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_a_short_reduction_lowers_with_a_full_swizzle_row(dtype):
    """K = 20 once shrank tile_k to half a 128-byte row (a 64-byte swizzle), which Mosaic GPU's layout
    inference rejects; K tiles are now never narrower than one 128-byte row."""
    assert tuning.mosaic_matmul_blocks(256, 256, 20, dtype=dtype).tile_k * jnp.dtype(dtype).itemsize == 128
    args = [jax.ShapeDtypeStruct(s, dtype) for s in ((256, 20), (20, 256), (256,))]
    _, rows = _lower(lambda a, b, bias: jax.grad(lambda a, b, c: matmul(a, b, c).astype(jnp.float32).sum(),
                                                 argnums=(0, 1, 2))(a, b, bias), *args)
    assert [r["lowering"] for r in rows] == ["mosaic"] * 3


def test_a_narrow_weight_gets_32_column_warpgroup_tiles():
    """N = 64 with a small bfloat16 weight: B is read (N, K) so each warpgroup owns 32 columns (no padding to
    128); an activation-sized B (the dB GEMM's dZ) is not transposed and keeps 64."""
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((4096, 256), (256, 64), (64,))]
    _, rows = _lower(lambda a, b, bias: jax.grad(lambda a, b, c: matmul(a, b, c, "relu").astype(jnp.float32).sum(),
                                                 argnums=(0, 1, 2))(a, b, bias), *args)
    waste = [r["macs"][1] / r["macs"][0] for r in rows]  # forward, dA, dB
    assert waste[0] == 1.0 and waste[1] == 1.0 and waste[2] == 2.0


def test_a_transposed_view_in_the_interpreter_is_an_error_not_a_hang():
    """The interpreter's wgmma cannot read a transposed shared-memory view, and a kernel failing inside it
    leaves its simulated warpgroups waiting on barriers forever: launch refuses such streams up front."""
    from fastgpu_jax.pallas_kernels import matmul_mgpu

    a = jnp.zeros((64, 64), jnp.bfloat16)
    bl = tuning.mosaic_matmul_blocks(64, 64, 64)
    streams = (matmul_mgpu.matrix_stream(64, 64, 1, k_minor=False, transposed=True),
               matmul_mgpu.matrix_stream(128, 64, 1, k_minor=False, transposed=False))
    with pytest.raises(ValueError, match="matmul_mgpu: the Mosaic GPU interpreter has no transposed"):
        matmul_mgpu.launch(a, jnp.zeros((64, 128), jnp.bfloat16), None, streams, bl=bl, tiles=(1, 1), splits=1,
                           k_iters=1, activation=None, save_z=False, out_dtype=jnp.bfloat16, interpret=True, sms=2,
                           name="matmul_mgpu", useful_macs=1)
