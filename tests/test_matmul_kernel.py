"""Pallas matmul (interpret mode on CPU) against jnp: forward, gradients, tuning, CUDA lowering."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastgpu_jax.pallas_kernels import lowering, tuning
from fastgpu_jax.pallas_kernels.matmul import matmul

ACT = {None: lambda z: z, "relu": jax.nn.relu, "gelu": jax.nn.gelu,
       "gelu_exact": lambda z: jax.nn.gelu(z, approximate=False)}
# float32 dots run in TF32 on a GPU (as XLA's do by default): 5e-3 there, full float32 in the CPU interpreter.
TOL = {jnp.float32: 5e-3 if jax.default_backend() == "gpu" else 2e-5, jnp.bfloat16: 2e-2}


def _ref(a, b, bias, activation, out_dtype=None):
    z = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")
    if bias is not None:
        z = z + bias.astype(jnp.float32)
    return ACT[activation](z).astype(out_dtype or a.dtype)


def _rand(rng, shape, dtype):
    return jnp.asarray(rng.normal(size=shape), dtype)


def _close(x, y, dtype):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    scale = max(1.0, float(np.abs(y).max()))
    np.testing.assert_allclose(x, y, atol=TOL[dtype] * scale, rtol=TOL[dtype])


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (7, 33, 5), (64, 32, 64), (100, 70, 130), (17, 257, 19)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("activation, with_bias", [(None, False), ("relu", True), ("gelu", True)])
def test_forward_matches_jnp(m, k, n, dtype, activation, with_bias):
    rng = np.random.default_rng(m * 1000 + n)
    a, b = _rand(rng, (m, k), dtype), _rand(rng, (k, n), dtype)
    bias = _rand(rng, (n,), dtype) if with_bias else None
    y = matmul(a, b, bias, activation)
    assert y.shape == (m, n) and y.dtype == dtype
    _close(y, _ref(a, b, bias, activation), dtype)


def test_leading_batch_dims_and_out_dtype():
    rng = np.random.default_rng(1)
    a, b = _rand(rng, (2, 3, 9, 40), jnp.bfloat16), _rand(rng, (40, 24), jnp.bfloat16)
    y = matmul(a, b, out_dtype=jnp.float32)
    assert y.shape == (2, 3, 9, 24) and y.dtype == jnp.float32
    _close(y, _ref(a, b, None, None, jnp.float32), jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("m, k, n", [(37, 50, 70), (5, 130, 18)])
def test_gradients_match_jnp(m, k, n, activation, dtype):
    rng = np.random.default_rng(7)
    a, b, bias = _rand(rng, (m, k), dtype), _rand(rng, (k, n), dtype), _rand(rng, (n,), dtype)
    w = _rand(rng, (m, n), jnp.float32)
    loss = lambda f: lambda *x: jnp.sum(f(*x).astype(jnp.float32) * w)  # noqa: E731
    got = jax.grad(loss(lambda a, b, c: matmul(a, b, c, activation)), argnums=(0, 1, 2))(a, b, bias)
    want = jax.grad(loss(lambda a, b, c: _ref(a, b, c, activation)), argnums=(0, 1, 2))(a, b, bias)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        _close(g, r, dtype)


def test_gradient_without_bias_and_under_jit():
    rng = np.random.default_rng(3)
    a, b = _rand(rng, (2, 11, 20), jnp.float32), _rand(rng, (20, 30), jnp.float32)
    f = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(matmul(a, b))), argnums=(0, 1)))
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(a @ b)), argnums=(0, 1)))
    for x, y in zip(f(a, b), g(a, b)):
        _close(x, y, jnp.float32)


def test_block_overrides_change_blocks_not_results():
    rng = np.random.default_rng(4)
    a, b = _rand(rng, (70, 90), jnp.float32), _rand(rng, (90, 50), jnp.float32)
    base = matmul(a, b)
    small = tuning.MatmulBlocks(16, 16, 16, 2, 1)
    np.testing.assert_allclose(matmul(a, b, blocks=small), base, rtol=1e-5, atol=1e-5)
    with tuning.use_blocks(matmul=small):
        assert tuning.matmul_blocks(70, 50, 90) == small
        np.testing.assert_allclose(matmul(a, b), base, rtol=1e-5, atol=1e-5)
    assert tuning.matmul_blocks(70, 50, 90) != small


def test_blocks_are_clamped_to_the_problem():
    b = tuning.matmul_blocks(5, 3000, 20, tuning.MatmulBlocks(128, 256, 64, 8, 3))
    assert (b.block_m, b.block_n, b.block_k) == (16, 256, 16)
    # the reduction block is halved while it would pad K by over 10%: 147 (a 7x7 RGB stem) -> 32, not 64
    assert tuning.matmul_blocks(4096, 64, 147, tuning.MatmulBlocks(128, 128, 64, 8, 3)).block_k == 32
    assert tuning.matmul_blocks(4096, 64, 768, tuning.MatmulBlocks(128, 128, 64, 8, 3)).block_k == 64


def test_tuning_table_round_trips_through_json(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "_LOADED", {})
    monkeypatch.setattr(tuning, "FASTER_THAN_XLA", {})
    tuning._LOADED[("cpu", "matmul", "small", "float32")] = tuning.MatmulBlocks(16, 32, 16, 2, 2)
    tuning.FASTER_THAN_XLA[("cpu", "matmul", "small")] = True
    tuning.save_table(str(tmp_path / "t.json"))
    tuning._LOADED.clear()
    tuning.FASTER_THAN_XLA.clear()
    tuning.load_table(str(tmp_path / "t.json"))
    assert tuning.matmul_blocks(16, 32, 16, dtype=jnp.float32) == tuning.MatmulBlocks(16, 32, 16, 2, 2)
    assert tuning.matmul_blocks(16, 32, 16, dtype=jnp.bfloat16) != tuning.MatmulBlocks(16, 32, 16, 2, 2)
    assert tuning.pallas_is_faster("matmul", "small")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        tuning.load_table(str(tmp_path / "nope.json"))
    old = tmp_path / "old.json"  # a conv row from before the implicit-GEMM redesign
    old.write_text('{"blocks": [{"kind": "H100", "op": "conv2d", "shape_class": "large", '
                   '"blocks": {"block_w": 64, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3}}]}')
    with pytest.raises(ValueError, match=r"old.json: conv2d blocks .*block_w.* are not ConvBlocks fields"):
        tuning.load_table(str(old))


def test_autotune_refuses_cpu():
    with pytest.raises(RuntimeError, match="GPU"):
        tuning.autotune("matmul", "small", [tuning.MatmulBlocks()], lambda b: (lambda x: x), jnp.ones(2))


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(5, 6\)"):
        matmul(jnp.ones((3, 4)), jnp.ones((5, 6)))
    with pytest.raises(ValueError, match="activation"):
        matmul(jnp.ones((3, 4)), jnp.ones((4, 6)), activation="tanh")
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        matmul(jnp.ones((3, 4)), jnp.ones((4, 6)), jnp.ones((5,)))


MATMUL_ENTRIES = [(k, v) for k, v in tuning.TABLE.items() if k[1] == "matmul"]


@pytest.mark.parametrize("entry", MATMUL_ENTRIES, ids=lambda e: "-".join(e[0]))
def test_every_tuning_entry_lowers_for_cuda(entry):
    """Triton lowering rules (power-of-2 blocks, dot dims >= 16) checked from CPU, forward and backward."""
    (_, _, _, dtype), blocks = entry
    dtype, activation = (jnp.bfloat16, "gelu") if dtype == "bfloat16" else (jnp.float32, "relu")
    m, k, n = 2 * blocks.block_m + 3, 3 * blocks.block_k + 5, 2 * blocks.block_n - 7

    def f(a, b, bias):
        y, vjp = jax.vjp(lambda *x: matmul(*x, activation, blocks=blocks, interpret=False), a, b, bias)
        return y, vjp(y)

    args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((k, n), dtype),
            jax.ShapeDtypeStruct((n,), dtype))
    with lowering.lower_for_gpu():
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call") >= 3  # fwd, dA, dB


def test_a_non_power_of_two_block_is_caught_by_cuda_lowering():
    bad = dataclasses.replace(tuning.MatmulBlocks(), block_m=48)
    args = (jax.ShapeDtypeStruct((96, 64), jnp.float32), jax.ShapeDtypeStruct((64, 64), jnp.float32))
    with pytest.raises(Exception, match="power of 2"), lowering.lower_for_gpu():
        jax.jit(lambda a, b: matmul(a, b, blocks=bad, interpret=False)).trace(*args).lower(
            lowering_platforms=("cuda",))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_exact_gelu_epilogue_and_its_gradient(dtype):
    """The erf-form GELU (ViT's MLP) in the epilogue: the kernel's erf polynomial against jax.nn.gelu's."""
    rng = np.random.default_rng(5)
    a, b, bias = _rand(rng, (45, 70), dtype), _rand(rng, (70, 33), dtype), _rand(rng, (33,), dtype)
    _close(matmul(a, b, bias, "gelu_exact"), _ref(a, b, bias, "gelu_exact"), dtype)
    w = _rand(rng, (45, 33), jnp.float32)
    loss = lambda f: lambda *x: jnp.sum(f(*x).astype(jnp.float32) * w)  # noqa: E731
    got = jax.grad(loss(lambda *x: matmul(*x, "gelu_exact")), argnums=(0, 1, 2))(a, b, bias)
    want = jax.grad(loss(lambda *x: _ref(*x, "gelu_exact")), argnums=(0, 1, 2))(a, b, bias)
    for g, r in zip(got, want):
        _close(g, r, dtype)
    z = jnp.linspace(-6.0, 6.0, 1001)
    mm = importlib.import_module("fastgpu_jax.pallas_kernels.matmul")
    np.testing.assert_allclose(mm.activate(z, "gelu_exact"), jax.nn.gelu(z, approximate=False), atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_split_reductions_match_jnp(monkeypatch, dtype, activation):
    """A small tile grid splits the reduction over programs (float32 partials, epilogue in XLA): forward,
    dA and dB all split here (4x3 tiles of 16, reductions of 7-12 blocks, uneven last split)."""
    mm = importlib.import_module("fastgpu_jax.pallas_kernels.matmul")
    monkeypatch.setattr(mm, "SPLIT_TARGET", 40)
    monkeypatch.setattr(mm, "MIN_SPLIT_STEPS", 2)
    assert mm.splits_for(12, 7) == (3, 3) and mm.splits_for(12, 12) == (4, 3) and mm.splits_for(64, 100) == (1, 100)
    rng = np.random.default_rng(11)
    a, b, bias = _rand(rng, (60, 110), dtype), _rand(rng, (110, 45), dtype), _rand(rng, (45,), dtype)
    blocks = tuning.MatmulBlocks(16, 16, 16, 4, 2)
    w = _rand(rng, (60, 45), jnp.float32)
    loss = lambda f: lambda *x: jnp.sum(f(*x).astype(jnp.float32) * w)  # noqa: E731
    y = matmul(a, b, bias, activation, blocks=blocks)
    _close(y, _ref(a, b, bias, activation), dtype)
    got = jax.grad(loss(lambda *x: matmul(*x, activation, blocks=blocks)), argnums=(0, 1, 2))(a, b, bias)
    want = jax.grad(loss(lambda *x: _ref(*x, activation)), argnums=(0, 1, 2))(a, b, bias)
    for g, r in zip(got, want):
        _close(g, r, dtype)


def test_grouped_order_visits_every_tile_once():
    mm = importlib.import_module("fastgpu_jax.pallas_kernels.matmul")
    for tm, tn in [(1, 1), (3, 5), (8, 2), (19, 7)]:
        tiles = [tuple(int(v) for v in mm.grouped(jnp.int32(p), tm, tn)) for p in range(tm * tn)]
        assert sorted(tiles) == [(i, j) for i in range(tm) for j in range(tn)]
        # consecutive programs stay within GROUP_M tile rows
        assert all(abs(a[0] - b[0]) < mm.GROUP_M for a, b in zip(tiles, tiles[1:]) if a[1] == b[1])
