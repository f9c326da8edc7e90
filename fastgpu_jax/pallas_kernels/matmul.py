"""Tiled matmul with a fused bias + activation epilogue, forward and backward in Pallas (Triton lowering).

    matmul(a, b, bias=None, activation=None) == act(a @ b + bias)     a: (..., K), b: (K, N), bias: (N,)

One kernel shape serves the three products of a training step: each program computes one output tile,
looping over its share of the reduction inside the kernel into a float32 accumulator (``_reduce``):

* forward ``Y = act(A·B + bias)`` (NN), the epilogue fused when the whole reduction runs in one program;
* input gradient ``dA = dZ·Bᵀ`` (NT) and weight gradient ``dB = Aᵀ·dZ`` (TN), where ``dZ = dY·act'(·)`` is
  computed inside the kernel from the saved output (relu) or pre-activation (gelu), never materialised;
  ``dbias = Σ_rows dZ`` is one fused XLA reduction.

Why it is laid out this way (each point is checked by ``benchmarks/sm90_check.py`` on an H100 compile):

* **Grouped program order.** Programs walk the output in groups of ``GROUP_M`` tile rows (``_grouped``), so
  the A rows and B columns a wave of programs reads stay in L2 (the order of Triton's matmul tutorial).
* **Split-K when the grid is small.** A weight gradient such as ResNet-50's 64x256 1x1 conv has 2 output
  tiles but reduces over 800k pixels; a classifier forward has 16 tiles. When the tiles are fewer than
  ``SPLIT_TARGET`` programs, the reduction is split over a second grid axis (``_splits``): each split writes
  a float32 partial tile, XLA adds the partials and applies the epilogue. No program ever adds into
  another's output block (that races on a GPU and passes on CPU).
* Inputs are zero-padded to block multiples and the result sliced, so any M/K/N works.

File order: helpers, kernel bodies, launches, custom_vjp wiring, public function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fastgpu_jax.pallas_kernels import lowering, matmul_mgpu, tuning
from fastgpu_jax.pallas_kernels.epilogue import act_grad, activate
from fastgpu_jax.pallas_kernels.lowering import div_mod, launch, pad_axis

ACTIVATIONS = (None, "relu", "gelu", "gelu_exact")  # gelu: tanh form (flax's default); gelu_exact: erf form
GROUP_M = 8  # tile rows per program group (L2 reuse)
SPLIT_TARGET = 264  # programs wanted per launch: two waves of an H100's 132 SMs
MIN_SPLIT_STEPS = 1  # a split reduces over at least this many blocks
_NN = (((1,), (0,)), ((), ()))  # (m, k) @ (k, n)
_NT = (((1,), (1,)), ((), ()))  # (m, n) @ (k, n)ᵀ
_TN = (((0,), (0,)), ((), ()))  # (m, k)ᵀ @ (m, n)


# --- helpers shared with conv2d --------------------------------------------------------------------------

def grouped(p, tiles_m: int, tiles_n: int):
    """Program ``p`` of a 1-D grid -> output tile (i, j), walking GROUP_M tile rows at a time."""
    if tiles_m == 1 or tiles_n == 1:  # one row or column of tiles: nothing to group
        return (0, p) if tiles_m == 1 else (p, 0)
    group, within = div_mod(p, GROUP_M * tiles_n)
    first = group * GROUP_M
    size = jnp.minimum(tiles_m - first, GROUP_M)
    return first + within % size, within // size


def splits_for(tiles: int, steps: int) -> tuple[int, int]:
    """(splits, steps per split) of a reduction of ``steps`` blocks over ``tiles`` output tiles: enough
    splits for about SPLIT_TARGET programs, each at least MIN_SPLIT_STEPS long; no split is empty."""
    want = -(-SPLIT_TARGET // tiles)
    splits = max(1, min(want, steps // MIN_SPLIT_STEPS))
    per = -(-steps // splits)
    return -(-steps // per), per


def unwrap(x):
    """The value of a custom_vjp input under ``symbolic_zeros`` (None stays None)."""
    return None if x is None else x.value


def reduce_steps(step, per: int, steps: int, shape):
    """Σ step(r) over this program's split of range(steps), in a float32 accumulator."""
    acc = jnp.zeros(shape, jnp.float32)
    if per >= steps:
        return lax.fori_loop(0, steps, lambda r, acc: acc + step(r), acc)
    lo = pl.program_id(1) * per
    return lax.fori_loop(lo, jnp.minimum(lo + per, steps), lambda r, acc: acc + step(r), acc)


# --- kernel bodies ----------------------------------------------------------------------------------------

def _forward_kernel(a_ref, b_ref, *refs, bk, steps, per, activation, has_bias, save_z):
    bias_ref = refs[0] if has_bias else None
    out_refs = refs[1:] if has_bias else refs

    def step(k):
        ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
        return lax.dot_general(a_ref[:, ks], b_ref[ks, :], _NN, preferred_element_type=jnp.float32)

    z = reduce_steps(step, per, steps, out_refs[0].shape)
    if per < steps:  # a split: the partial goes out as is, XLA adds the splits and applies the epilogue
        out_refs[0][...] = z
        return
    if has_bias:
        z = z + bias_ref[...].astype(jnp.float32)
    out_refs[0][...] = activate(z, activation).astype(out_refs[0].dtype)
    if save_z:
        out_refs[1][...] = z.astype(out_refs[1].dtype)


def _grad_a_kernel(dy_ref, *refs, bn, steps, per, activation):
    """dA tile (bm, bk) = Σ_n dZ[:, n] · B[k, n]ᵀ."""
    saved_ref = refs[0] if activation else None
    b_ref, da_ref = refs[-2], refs[-1]

    def step(j):
        cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
        dz = act_grad(dy_ref[:, cols], saved_ref[:, cols] if activation else None, activation)
        return lax.dot_general(dz.astype(b_ref.dtype), b_ref[:, cols], _NT, preferred_element_type=jnp.float32)

    da_ref[...] = reduce_steps(step, per, steps, da_ref.shape).astype(da_ref.dtype)


def _grad_b_kernel(a_ref, dy_ref, *refs, bm, steps, per, activation):
    """dB tile (bk, bn) = Σ_m A[m, k]ᵀ · dZ[m, n]."""
    saved_ref = refs[0] if activation else None
    db_ref = refs[-1]

    def step(i):
        rows = pl.ds(pl.multiple_of(i * bm, bm), bm)
        dz = act_grad(dy_ref[rows, :], saved_ref[rows, :] if activation else None, activation)
        return lax.dot_general(a_ref[rows, :], dz.astype(a_ref.dtype), _TN, preferred_element_type=jnp.float32)

    db_ref[...] = reduce_steps(step, per, steps, db_ref.shape).astype(db_ref.dtype)


# --- launches ---------------------------------------------------------------------------------------------

def _tile_launch(kernel, name, args, in_specs, out_dtypes, out_rows, out_cols, bl, steps, interpret, useful):
    """Launches ``kernel`` over output tiles (bl.block_m x bl.block_n of an out_rows x out_cols output) in
    grouped order, split over the reduction when the tiles are few. ``in_specs`` are functions of the tile
    (i, j) giving block indices; ``useful`` counts the multiply-adds of the unpadded problem. Returns
    (outputs, split): the finished tiles, or (split=True) the float32 sum of the partials, to which the
    caller applies any epilogue."""
    tm, tn = out_rows // bl.block_m, out_cols // bl.block_n
    splits, per = splits_for(tm * tn, steps)
    specs = [pl.BlockSpec(shape, lambda p, s, f=f: f(*grouped(p, tm, tn))) for shape, f in in_specs]
    tile = (bl.block_m, bl.block_n)
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((out_rows, out_cols), d) for d in out_dtypes]
        out_specs = [pl.BlockSpec(tile, lambda p, s: grouped(p, tm, tn)) for _ in out_dtypes]
    else:
        out_shape = [jax.ShapeDtypeStruct((splits, out_rows, out_cols), jnp.float32)]
        out_specs = [pl.BlockSpec((None, *tile), lambda p, s: (s, *grouped(p, tm, tn)))]
    outs = launch(functools.partial(kernel, steps=steps, per=per), out_shape=out_shape, grid=(tm * tn, splits),
                  in_specs=specs, out_specs=out_specs, num_warps=bl.num_warps, num_stages=bl.num_stages,
                  interpret=interpret, name=name, macs=(useful, out_rows * out_cols * steps * bl.block_k))(*args)
    return (outs, False) if splits == 1 else ([outs[0].sum(axis=0)], True)


def _split_epilogue(z, bias, activation, out_dtype, save_z):
    """(y, z or None) from the float32 sum of split-K partials: the epilogue in XLA."""
    z = z if bias is None else z + bias.astype(jnp.float32)
    return activate(z, activation).astype(out_dtype), (z.astype(out_dtype) if save_z else None)


def _forward(a, b, bias, activation, out_dtype, blocks, interpret, lower="triton"):
    """(y, z or None) for 2-D a (M, K), b (K, N); z is the pre-activation, kept only for gelu."""
    (m, k), n = a.shape, b.shape[1]
    save_z = activation in ("gelu", "gelu_exact")
    if lower == "mosaic":
        outs, split = matmul_mgpu.gemm(a, b, bias, activation=activation, save_z=save_z, out_dtype=out_dtype,
                                       blocks=_mosaic(blocks), interpret=interpret)
        if split:
            return _split_epilogue(outs[0], bias, activation, out_dtype, save_z)
        return outs[0], (outs[1] if save_z else None)
    bl = tuning.matmul_blocks(m, n, k, blocks, dtype=a.dtype)
    a_p = pad_axis(pad_axis(a, 0, bl.block_m), 1, bl.block_k)
    b_p = pad_axis(pad_axis(b, 0, bl.block_k), 1, bl.block_n)
    (mp, kp), np_ = a_p.shape, b_p.shape[1]
    in_specs = [((bl.block_m, kp), lambda i, j: (i, 0)), ((kp, bl.block_n), lambda i, j: (0, j))]
    args = [a_p, b_p]
    if bias is not None:
        args.append(pad_axis(bias.reshape(1, n), 1, bl.block_n))
        in_specs.append(((1, bl.block_n), lambda i, j: (0, j)))
    kernel = functools.partial(_forward_kernel, bk=bl.block_k, activation=activation,
                               has_bias=bias is not None, save_z=save_z)
    outs, split = _tile_launch(kernel, "matmul_fwd", args, in_specs, [out_dtype] * (2 if save_z else 1), mp, np_,
                               bl, kp // bl.block_k, interpret, m * n * k)
    if split:  # the split-K partials were summed: the epilogue runs here, in XLA
        return _split_epilogue(outs[0][:m, :n], bias, activation, out_dtype, save_z)
    return outs[0][:m, :n], (outs[1][:m, :n] if save_z else None)


def _mosaic(blocks):
    """The blocks argument as the Mosaic body reads it: its own tiles, or None for a Triton block override."""
    return blocks if isinstance(blocks, tuning.MosaicMatmulBlocks) else None


def _dz(dy, saved, activation, dtype):
    """dZ = dY·act'(·) materialised once in ``dtype`` (one fused XLA pass): the Mosaic gradient GEMMs read it."""
    return (act_grad(dy, saved, activation) if activation else dy).astype(dtype)


def _grad_a(dy, saved, b, activation, blocks, interpret, lower="triton"):
    """dA (M, K) = dZ (M, N) · Bᵀ, reducing over N."""
    if lower == "mosaic":  # dy is dZ already (``_matmul2d_bwd``)
        (da,), _ = matmul_mgpu.gemm(dy, b, trans_b=True, out_dtype=b.dtype, blocks=_mosaic(blocks),
                                    interpret=interpret)
        return da.astype(b.dtype)
    (m, n), k = dy.shape, b.shape[0]
    bl = tuning.matmul_blocks(m, k, n, blocks, dtype=b.dtype)  # tiles over (M, K); reduce N by block_k
    bm, bk_out, bn = bl.block_m, bl.block_n, bl.block_k
    dy_p = pad_axis(pad_axis(dy, 0, bm), 1, bn)
    b_p = pad_axis(pad_axis(b, 0, bk_out), 1, bn)
    (mp, np_), kp = dy_p.shape, b_p.shape[0]
    rows = ((bm, np_), lambda i, j: (i, 0))
    args, specs = [dy_p], [rows]
    if activation:
        args.append(pad_axis(pad_axis(saved, 0, bm), 1, bn))
        specs.append(rows)
    args.append(b_p)
    specs.append(((bk_out, np_), lambda i, j: (j, 0)))
    kernel = functools.partial(_grad_a_kernel, bn=bn, activation=activation)
    (da,), _ = _tile_launch(kernel, "matmul_grad_a", args, specs, [b.dtype], mp, kp, bl, np_ // bn, interpret,
                            m * n * k)
    return da[:m, :k].astype(b.dtype)  # float32 when the reduction was split


def _grad_b(a, dy, saved, activation, blocks, interpret, lower="triton"):
    """dB (K, N) = Aᵀ · dZ, reducing over M (split over programs when the K x N tiles are few)."""
    if lower == "mosaic":  # dy is dZ already (``_matmul2d_bwd``)
        (db,), _ = matmul_mgpu.gemm(a, dy, trans_a=True, out_dtype=a.dtype, blocks=_mosaic(blocks),
                                    interpret=interpret)
        return db.astype(a.dtype)
    (m, k), n = a.shape, dy.shape[1]
    bl = tuning.matmul_blocks(k, n, m, blocks, dtype=a.dtype)  # tiles over (K, N); reduce M by block_k
    bk_out, bn, bm = bl.block_m, bl.block_n, bl.block_k
    a_p = pad_axis(pad_axis(a, 0, bm), 1, bk_out)
    dy_p = pad_axis(pad_axis(dy, 0, bm), 1, bn)
    (mp, kp), np_ = a_p.shape, dy_p.shape[1]
    cols = ((mp, bn), lambda i, j: (0, j))
    args, specs = [a_p, dy_p], [((mp, bk_out), lambda i, j: (0, i)), cols]
    if activation:
        args.append(pad_axis(pad_axis(saved, 0, bm), 1, bn))
        specs.append(cols)
    kernel = functools.partial(_grad_b_kernel, bm=bm, activation=activation)
    (db,), _ = _tile_launch(kernel, "matmul_grad_b", args, specs, [a.dtype], kp, np_, bl, mp // bm, interpret,
                            m * n * k)
    return db[:k, :n].astype(a.dtype)


# --- custom_vjp wiring ------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _matmul2d(a, b, bias, activation, out_dtype, blocks, interpret, lower):
    return _forward(a, b, bias, activation, out_dtype, blocks, interpret, lower)[0]


def _matmul2d_fwd(a, b, bias, activation, out_dtype, blocks, interpret, lower):
    # symbolic_zeros: the inputs arrive as CustomVJPPrimal(value, perturbed), so a gradient nobody asked
    # for (the image input of a first layer) is never computed, not even traced.
    need_a, need_b = a.perturbed, b.perturbed
    a, b, bias = a.value, b.value, unwrap(bias)
    y, z = _forward(a, b, bias, activation, out_dtype, blocks, interpret, lower)
    saved = y if activation == "relu" else z
    return y, (a if need_b else None, b if need_a else None, bias, saved)


def _matmul2d_bwd(activation, out_dtype, blocks, interpret, lower, residuals, dy):
    a, b, bias, saved = residuals
    # dbias is one XLA reduction with dZ fused into it (nothing materialised, no extra launch).
    dbias = None if bias is None else act_grad(dy, saved, activation).sum(axis=0).astype(bias.dtype)
    if lower == "mosaic":  # the Mosaic GEMMs read dZ from memory: materialise it once for both
        dy = _dz(dy, saved, activation, (a if a is not None else b).dtype)
        saved, activation = None, None
    da = None if b is None else _grad_a(dy, saved, b, activation, blocks, interpret, lower)
    db = None if a is None else _grad_b(a, dy, saved, activation, blocks, interpret, lower)
    return da, db, dbias


_matmul2d.defvjp(_matmul2d_fwd, _matmul2d_bwd, symbolic_zeros=True)


# --- public -----------------------------------------------------------------------------------------------

def chosen_lowering(m: int, k: int, n: int) -> str:
    """"mosaic" or "triton" for an (m, k) @ (k, n) matmul here (``lowering.chosen``; decided once per call, so
    the backward runs on the forward's lowering)."""
    slow = tuning.triton_is_faster("matmul", tuning.matmul_shape_class(m, n, k))
    return lowering.chosen("matmul", tuning.device_kind(), slow)


def matmul(a, b, bias=None, activation=None, *, out_dtype=None, blocks: tuning.MatmulBlocks | None = None,
           interpret: bool | None = None):
    """``act(a @ b + bias)`` for a (..., K), b (K, N), bias (N,) or None; activation one of ``ACTIVATIONS``
    (``jax.nn.relu``, ``jax.nn.gelu`` with approximate=True and with approximate=False).

    Inputs are promoted to a common dtype (float32 or bfloat16 are the tuned cases); accumulation is float32;
    the result has ``out_dtype`` (default: the input dtype). Leading batch dims of ``a`` are flattened into M.
    ``blocks`` overrides the tuning table (``MatmulBlocks`` for the Triton body, ``MosaicMatmulBlocks`` for the
    Mosaic GPU one); ``interpret`` defaults to True on CPU. The lowering is ``lowering.chosen`` (see
    ``lowering.use_lowering``). Differentiable in a, b, bias.
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
    lower = chosen_lowering(*a2.shape, b.shape[1])
    y = _matmul2d(a2, b.astype(dtype), bias, activation, out_dtype, blocks, interpret, lower)
    return y.reshape(lead + (b.shape[1],))
