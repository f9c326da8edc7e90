"""Tiled matmul with a fused bias + activation epilogue, forward and backward in Pallas (Triton lowering).

    matmul(a, b, bias=None, activation=None) == act(a @ b + bias)     a: (..., K), b: (K, N), bias: (N,)

Each program computes one (block_m, block_n) tile of the output, looping over K inside the kernel with a
float32 accumulator (never accumulating across a grid axis). Inputs are zero-padded to block multiples
and the result sliced, so any M/K/N works. The backward is three more kernels: dA = dZ·Bᵀ, dB = Aᵀ·dZ and
dbias = Σ_rows dZ, where dZ = dY·act'(·) is computed inside each of them from the saved output (relu) or
pre-activation (gelu) rather than materialised.

File order: kernel bodies, their launches, custom_vjp wiring, public function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fastgpu_jax.pallas_kernels import tuning
from fastgpu_jax.pallas_kernels.lowering import launch, pad_axis

ACTIVATIONS = (None, "relu", "gelu")
_NN = (((1,), (0,)), ((), ()))  # (m, k) @ (k, n)
_NT = (((1,), (1,)), ((), ()))  # (m, n) @ (k, n)ᵀ
_TN = (((0,), (0,)), ((), ()))  # (m, k)ᵀ @ (m, n)


def _activate(z, activation):
    if activation == "relu":
        return jnp.maximum(z, 0.0)
    if activation == "gelu":
        return jax.nn.gelu(z, approximate=True)  # flax.linen.gelu's default
    return z


def _act_grad(dy, saved, activation):
    """dZ = dY * act'(·): ``saved`` is the output for relu and the pre-activation for gelu."""
    dy = dy.astype(jnp.float32)
    if activation == "relu":
        return jnp.where(saved.astype(jnp.float32) > 0, dy, 0.0)
    if activation == "gelu":
        z = saved.astype(jnp.float32)
        c = 0.7978845608028654  # sqrt(2 / pi)
        inner = c * (z + 0.044715 * z * z * z)
        t = jnp.tanh(inner)
        d_inner = c * (1.0 + 3 * 0.044715 * z * z)
        return dy * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * d_inner)
    return dy


# --- kernel bodies ----------------------------------------------------------------------------------------

def _forward_kernel(a_ref, b_ref, *refs, nk, bk, activation, has_bias, save_z):
    bias_ref = refs[0] if has_bias else None
    y_ref = refs[1] if has_bias else refs[0]
    z_ref = refs[-1] if save_z else None

    def body(k, acc):
        a = a_ref[:, pl.ds(k * bk, bk)]
        b = b_ref[pl.ds(k * bk, bk), :]
        return acc + lax.dot_general(a, b, _NN, preferred_element_type=jnp.float32)

    z = lax.fori_loop(0, nk, body, jnp.zeros(y_ref.shape, jnp.float32))
    if has_bias:
        z = z + bias_ref[...].astype(jnp.float32)
    y_ref[...] = _activate(z, activation).astype(y_ref.dtype)
    if save_z:
        z_ref[...] = z.astype(z_ref.dtype)


def _grad_a_kernel(dy_ref, *refs, nn_, bn, activation):
    """dA tile (bm, bk) = Σ_n dZ[:, n] · B[k, n]ᵀ."""
    saved_ref = refs[0] if activation else None
    b_ref, da_ref = refs[-2], refs[-1]

    def body(j, acc):
        cols = pl.ds(j * bn, bn)
        dz = _act_grad(dy_ref[:, cols], saved_ref[:, cols] if activation else None, activation)
        return acc + lax.dot_general(dz.astype(b_ref.dtype), b_ref[:, cols], _NT,
                                     preferred_element_type=jnp.float32)

    da_ref[...] = lax.fori_loop(0, nn_, body, jnp.zeros(da_ref.shape, jnp.float32)).astype(da_ref.dtype)


def _grad_b_kernel(a_ref, dy_ref, *refs, nm, bm, activation):
    """dB tile (bk, bn) = Σ_m A[m, k]ᵀ · dZ[m, n]."""
    saved_ref = refs[0] if activation else None
    db_ref = refs[-1]

    def body(i, acc):
        rows = pl.ds(i * bm, bm)
        dz = _act_grad(dy_ref[rows, :], saved_ref[rows, :] if activation else None, activation)
        return acc + lax.dot_general(a_ref[rows, :], dz.astype(a_ref.dtype), _TN,
                                     preferred_element_type=jnp.float32)

    db_ref[...] = lax.fori_loop(0, nm, body, jnp.zeros(db_ref.shape, jnp.float32)).astype(db_ref.dtype)


def _grad_bias_kernel(dy_ref, *refs, nm, bm, activation):
    """dbias tile (1, bn) = Σ_m dZ[m, n]."""
    saved_ref = refs[0] if activation else None
    dbias_ref = refs[-1]

    def body(i, acc):
        rows = pl.ds(i * bm, bm)
        dz = _act_grad(dy_ref[rows, :], saved_ref[rows, :] if activation else None, activation)
        return acc + jnp.sum(dz, axis=0, keepdims=True)

    dbias_ref[...] = lax.fori_loop(0, nm, body, jnp.zeros(dbias_ref.shape, jnp.float32)).astype(dbias_ref.dtype)


# --- launches ---------------------------------------------------------------------------------------------

def _forward(a, b, bias, activation, out_dtype, blocks, interpret):
    """(y, z or None) for 2-D a (M, K), b (K, N); z is the pre-activation, kept only for gelu."""
    (m, k), n = a.shape, b.shape[1]
    bl = tuning.matmul_blocks(m, n, k, blocks)
    a_p = pad_axis(pad_axis(a, 0, bl.block_m), 1, bl.block_k)
    b_p = pad_axis(pad_axis(b, 0, bl.block_k), 1, bl.block_n)
    (mp, kp), np_ = a_p.shape, b_p.shape[1]
    grid = (mp // bl.block_m, np_ // bl.block_n)
    in_specs = [pl.BlockSpec((bl.block_m, kp), lambda i, j: (i, 0)),
                pl.BlockSpec((kp, bl.block_n), lambda i, j: (0, j))]
    args = [a_p, b_p]
    if bias is not None:
        args.append(pad_axis(bias.reshape(1, n), 1, bl.block_n))
        in_specs.append(pl.BlockSpec((1, bl.block_n), lambda i, j: (0, j)))
    tile = pl.BlockSpec((bl.block_m, bl.block_n), lambda i, j: (i, j))
    save_z = activation == "gelu"
    out_shape = [jax.ShapeDtypeStruct((mp, np_), out_dtype)] * (2 if save_z else 1)
    kernel = functools.partial(_forward_kernel, nk=kp // bl.block_k, bk=bl.block_k, activation=activation,
                               has_bias=bias is not None, save_z=save_z)
    outs = launch(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=[tile] * len(out_shape),
                  num_warps=bl.num_warps, num_stages=bl.num_stages, interpret=interpret, name="matmul_fwd")(*args)
    y = outs[0][:m, :n]
    return y, (outs[1][:m, :n] if save_z else None)


def _grad_a(dy, saved, b, activation, blocks, interpret):
    """dA (M, K) = dZ (M, N) · Bᵀ, reducing over N inside the kernel."""
    (m, n), k = dy.shape, b.shape[0]
    bl = tuning.matmul_blocks(m, k, n, blocks)  # output tile (block_m, block_n) over (M, K); reduce N by block_k
    bm, bk_out, bn = bl.block_m, bl.block_n, bl.block_k
    dy_p = pad_axis(pad_axis(dy, 0, bm), 1, bn)
    b_p = pad_axis(pad_axis(b, 0, bk_out), 1, bn)
    (mp, np_), kp = dy_p.shape, b_p.shape[0]
    rows = pl.BlockSpec((bm, np_), lambda i, j: (i, 0))
    args, specs = [dy_p], [rows]
    if activation:
        args.append(pad_axis(pad_axis(saved, 0, bm), 1, bn))
        specs.append(rows)
    args.append(b_p)
    specs.append(pl.BlockSpec((bk_out, np_), lambda i, j: (j, 0)))
    kernel = functools.partial(_grad_a_kernel, nn_=np_ // bn, bn=bn, activation=activation)
    da = launch(kernel, out_shape=jax.ShapeDtypeStruct((mp, kp), b.dtype), grid=(mp // bm, kp // bk_out),
                in_specs=specs, out_specs=pl.BlockSpec((bm, bk_out), lambda i, j: (i, j)),
                num_warps=bl.num_warps, num_stages=bl.num_stages, interpret=interpret, name="matmul_grad_a")(*args)
    return da[:m, :k]


def _grad_b(a, dy, saved, activation, blocks, interpret):
    """dB (K, N) = Aᵀ · dZ, reducing over M inside the kernel."""
    (m, k), n = a.shape, dy.shape[1]
    bl = tuning.matmul_blocks(k, n, m, blocks)  # output tile over (K, N); reduce M by block_k
    bk_out, bn, bm = bl.block_m, bl.block_n, bl.block_k
    a_p = pad_axis(pad_axis(a, 0, bm), 1, bk_out)
    dy_p = pad_axis(pad_axis(dy, 0, bm), 1, bn)
    (mp, kp), np_ = a_p.shape, dy_p.shape[1]
    cols = pl.BlockSpec((mp, bn), lambda i, j: (0, j))
    args, specs = [a_p, dy_p], [pl.BlockSpec((mp, bk_out), lambda i, j: (0, i)), cols]
    if activation:
        args.append(pad_axis(pad_axis(saved, 0, bm), 1, bn))
        specs.append(cols)
    kernel = functools.partial(_grad_b_kernel, nm=mp // bm, bm=bm, activation=activation)
    db = launch(kernel, out_shape=jax.ShapeDtypeStruct((kp, np_), a.dtype), grid=(kp // bk_out, np_ // bn),
                in_specs=specs, out_specs=pl.BlockSpec((bk_out, bn), lambda i, j: (i, j)),
                num_warps=bl.num_warps, num_stages=bl.num_stages, interpret=interpret, name="matmul_grad_b")(*args)
    return db[:k, :n]


def _grad_bias(dy, saved, activation, dtype, blocks, interpret):
    """dbias (N,) = Σ_m dZ[m, :]."""
    m, n = dy.shape
    bl = tuning.matmul_blocks(m, n, m, blocks)
    bm, bn = bl.block_m, bl.block_n
    dy_p = pad_axis(pad_axis(dy, 0, bm), 1, bn)
    mp, np_ = dy_p.shape
    cols = pl.BlockSpec((mp, bn), lambda j: (0, j))
    args, specs = [dy_p], [cols]
    if activation:
        args.append(pad_axis(pad_axis(saved, 0, bm), 1, bn))
        specs.append(cols)
    kernel = functools.partial(_grad_bias_kernel, nm=mp // bm, bm=bm, activation=activation)
    out = launch(kernel, out_shape=jax.ShapeDtypeStruct((1, np_), dtype), grid=(np_ // bn,), in_specs=specs,
                 out_specs=pl.BlockSpec((1, bn), lambda j: (0, j)), num_warps=bl.num_warps,
                 num_stages=bl.num_stages, interpret=interpret, name="matmul_grad_bias")(*args)
    return out[0, :n]


# --- custom_vjp wiring ------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _matmul2d(a, b, bias, activation, out_dtype, blocks, interpret):
    return _forward(a, b, bias, activation, out_dtype, blocks, interpret)[0]


def _matmul2d_fwd(a, b, bias, activation, out_dtype, blocks, interpret):
    y, z = _forward(a, b, bias, activation, out_dtype, blocks, interpret)
    saved = {"relu": y, "gelu": z}.get(activation)
    return y, (a, b, bias, saved)


def _matmul2d_bwd(activation, out_dtype, blocks, interpret, residuals, dy):
    a, b, bias, saved = residuals
    da = _grad_a(dy, saved, b, activation, blocks, interpret).astype(a.dtype)
    db = _grad_b(a, dy, saved, activation, blocks, interpret).astype(b.dtype)
    dbias = None if bias is None else _grad_bias(dy, saved, activation, bias.dtype, blocks, interpret)
    return da, db, dbias


_matmul2d.defvjp(_matmul2d_fwd, _matmul2d_bwd)


# --- public -----------------------------------------------------------------------------------------------

def matmul(a, b, bias=None, activation=None, *, out_dtype=None, blocks: tuning.MatmulBlocks | None = None,
           interpret: bool | None = None):
    """``act(a @ b + bias)`` for a (..., K), b (K, N), bias (N,) or None; activation None | "relu" | "gelu".

    Inputs are promoted to a common dtype (float32 or bfloat16 are the tuned cases); accumulation is float32;
    the result has ``out_dtype`` (default: the input dtype). Leading batch dims of ``a`` are flattened into M.
    ``blocks`` overrides the tuning table; ``interpret`` defaults to True on CPU. Differentiable in a, b, bias.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"matmul activation {activation!r} is unknown; use one of {ACTIVATIONS}")
    if b.ndim != 2 or a.ndim < 1 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"matmul expects a (..., K) and b (K, N); got {a.shape} and {b.shape}")
    if bias is not None and bias.shape != (b.shape[1],):
        raise ValueError(f"matmul bias must have shape ({b.shape[1]},), got {bias.shape}")
    dtype = jnp.promote_types(a.dtype, b.dtype)
    out_dtype = jnp.dtype(out_dtype or dtype)
    lead = a.shape[:-1]
    a2 = a.reshape((-1, a.shape[-1])).astype(dtype)
    y = _matmul2d(a2, b.astype(dtype), bias, activation, out_dtype, blocks, interpret)
    return y.reshape(lead + (b.shape[1],))
