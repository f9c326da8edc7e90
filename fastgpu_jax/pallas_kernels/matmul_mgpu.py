"""The matmul's Mosaic GPU (Hopper) body: one warp-specialised GEMM serving the forward, dA and dB products.

    gemm(a, b, bias, trans_a=, trans_b=, activation=, save_z=, out_dtype=, blocks=)
        == act(op(a) @ op(b) + bias)        op(x) = xᵀ when trans_x

``matmul.py`` owns the custom_vjp and calls this body instead of its Triton kernels when
``lowering.use_mosaic("matmul", ...)`` says so; the parameters, tolerances and gradients are the same.

How one launch runs on an H100 (the layout of JAX's ``hopper_matmul_mgpu`` example, written for our products):

* **Persistent grid.** One CTA per SM (``lowering.num_sms``) walks the output tiles with ``plgpu.nd_loop``;
  ``plgpu.planar_snake`` orders them in bands of ``group`` tiles so neighbouring CTAs share A rows and B columns
  in L2.
* **Warp specialisation.** Three warpgroups: one issues TMA bulk copies of the A and B tiles into swizzled
  shared memory (``stages`` deep, ``emit_pipeline_warp_specialized``), two consume them with ``wgmma``, each
  owning half of the CTA tile's columns in registers (the float32 accumulator).
* **Transposes are free for 16-bit inputs.** dA = dZ·Bᵀ and dB = Aᵀ·dZ read B and A as stored and hand wgmma a
  transposed shared-memory view. wgmma takes float32 (as TF32, like the Triton path's default) only K-major,
  A as (M, K) and B as (N, K), so for float32 XLA transposes the operands stored otherwise first (the forward's
  weight, dB's two inputs): one extra pass over them. bfloat16 is the fast path on Hopper.
* **Fused epilogue, stored by TMA.** bias (TMA-copied per tile while its K loop runs, broadcast over the rows)
  and relu/gelu are applied in registers, the result (and, for gelu, the pre-activation the backward needs) goes
  through shared memory in 64-row slices of 128 bytes and out with TMA stores, double-buffered.
* **Narrow N** (<= 64): each warpgroup may own 32 columns when B is read (N, K) (``narrow_columns``).
* **Split-K** when the output tiles are fewer than the SMs (a weight gradient reducing over many pixels): the
  reduction is split into equal ranges as extra work items, each writing a float32 partial; XLA adds them and
  applies the epilogue (``matmul.py``), as on the Triton path.

Inputs are zero-padded to tile multiples and the result sliced (TMA could clip instead; padding keeps the
interpreter's bounds checks meaningful). The backward's dZ = dY·act'(·) is one fused XLA elementwise pass here,
not recomputed inside both gradient kernels as on the Triton path: the consumer warpgroups read operands only
from shared memory.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fastgpu_jax.pallas_kernels import lowering, tuning
from fastgpu_jax.pallas_kernels.epilogue import activate
from fastgpu_jax.pallas_kernels.lowering import pad_axis

_WGS = 2  # consumer warpgroups per CTA, side by side along N
EPI_M = 64  # rows of one epilogue slice (the shared-memory staging of the TMA store)


def split_k(tiles: int, steps: int, sms: int) -> tuple[int, int]:
    """(splits, steps per split): enough equal splits of the reduction's ``steps`` blocks that the work items
    (tiles x splits) fill the ``sms`` CTAs; no split is empty. The reduction is then padded to splits x per."""
    splits = max(1, min(-(-sms // tiles), steps))
    per = -(-steps // splits)
    return -(-steps // per), per


def _swizzled(tile_minor: int, dtype):
    """TMA tiling + the widest swizzle that a row of ``tile_minor`` elements fills."""
    plgpu = lowering.plgpu()
    swizzle = plgpu.find_swizzle(tile_minor * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _operand_spec(block, index, minor: int, dtype):
    plgpu = lowering.plgpu()
    return plgpu.BlockSpec(block, index, transforms=_swizzled(minor, dtype), memory_space=plgpu.SMEM)


@dataclasses.dataclass(frozen=True)
class Stream:
    """How one operand's K steps reach shared memory for one output tile.

    ``block`` is what one K step copies, ``index(k, split)`` which block of the tile's view step k of reduction
    split ``split`` is (a matrix ignores the split: its view starts there), and
    ``view(gmem, i, split)`` the view of the operand that tile ``i`` (along M for A, N for B) walks in reduction
    split ``split``. ``transposed``: the block is stored the other way round from what wgmma reads (A as
    (K, M), B as (N, K)), so wgmma gets a transposed shared-memory view. A matrix operand is ``matrix_stream``;
    the conv's implicit GEMM (``conv_mgpu.py``) shifts the views or the block rows by its taps' offsets.
    """

    block: tuple
    index: Callable
    view: Callable
    transposed: bool


def matrix_stream(tile: int, tk: int, k_iters: int, *, k_minor: bool, transposed: bool) -> Stream:
    """A plain matrix stored (tile dim, K) when ``k_minor``, else (K, tile dim)."""
    def view(gmem, i, split):
        free, ks = pl.ds(i * tile, tile), pl.ds(split * k_iters * tk, k_iters * tk)
        return gmem.at[free, ks] if k_minor else gmem.at[ks, free]
    if k_minor:
        return Stream((tile, tk), lambda k, split: (0, k), view, transposed)
    return Stream((tk, tile), lambda k, split: (k, 0), view, transposed)


def _kernel(a_gmem, b_gmem, *refs, bl, a_stream, b_stream, activation, has_bias, m_iters, n_iters, splits,
            k_iters):
    """One CTA: loops over its share of (split, tile_m row, tile_n column) work items."""
    plgpu = lowering.plgpu()
    bias_gmem = refs[0] if has_bias else None
    outs = refs[1:] if has_bias else refs
    tm, tn = bl.tile_m, bl.tile_n
    cta_n = _WGS * tn
    out_dtype = outs[0].dtype
    epi_n = min(bl.epi_n, tn, 128 // jnp.dtype(out_dtype).itemsize)  # 128-byte rows: 32 KB of staging
    slots = min(2, (tm // EPI_M) * (tn // epi_n))
    dtype = a_gmem.dtype

    def pipeline(body, context, split=0):
        def spec(s):
            return _operand_spec(s.block, lambda k: s.index(k, split), s.block[-1], dtype)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, wg_axis="wg", num_compute_wgs=_WGS,
            max_concurrent_steps=min(bl.stages, k_iters), compute_context=context,
            in_specs=[spec(a_stream), spec(b_stream)])

    ignore = lambda *_, **__: None  # noqa: E731 - the bodies do not change the allocations

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
        out_smem=plgpu.SMEM((_WGS, slots, EPI_M, epi_n), out_dtype, transforms=_swizzled(epi_n, out_dtype)),
        bias_smem=plgpu.SMEM((_WGS, tn), bias_gmem.dtype) if has_bias else None,
        bias_barrier=plgpu.Barrier(num_barriers=_WGS) if has_bias else None,
        collective_axes="wg")
    def _scope(allocs, out_smem, bias_smem, bias_barrier):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((splits * m_iters * n_iters,), collective_axes="sm")
        def _tiles(info):
            (item,) = info.index
            split, tile = item // (m_iters * n_iters), item % (m_iters * n_iters)
            mi, ni = plgpu.planar_snake(tile, (m_iters, n_iters), 1, bl.group)
            wg_cols = pl.ds(wg * tn, tn)

            def mma(_, a_smem, b_smem, acc_ref):
                # ref.transpose: what plgpu.transpose_ref did before jax 0.11 deprecated it.
                a_op = a_smem.transpose((1, 0)) if a_stream.transposed else a_smem
                b_op = b_smem.at[wg_cols, :].transpose((1, 0)) if b_stream.transposed else b_smem.at[:, wg_cols]
                plgpu.wgmma(acc_ref, a_op, b_op)
                plgpu.wgmma_wait(0)
                return acc_ref

            def context(run):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                def _acc(acc_ref):
                    if has_bias:  # this warpgroup's tn bias values, in flight while the tile's K loop runs
                        plgpu.copy_gmem_to_smem(bias_gmem.at[0, pl.ds(ni * cta_n + wg * tn, tn)],
                                                bias_smem.at[wg], bias_barrier.at[wg])
                    run(acc_ref)
                    z = acc_ref[...]
                    if has_bias:  # broadcast over the rows
                        plgpu.barrier_wait(bias_barrier.at[wg])
                        bias = bias_smem[wg]
                        z = z + lax.broadcast_in_dim(bias.astype(jnp.float32), (tm, tn), [1])
                    results = [activate(z, activation)] + [z] * (len(outs) - 1)
                    out_rows = pl.ds(split * m_iters * tm + mi * tm, tm)
                    _store(results, outs, out_smem, wg, out_rows, pl.ds(ni * cta_n + wg * tn, tn), epi_n, slots)

            views = a_stream.view(a_gmem, mi, split), b_stream.view(b_gmem, ni, split)
            pipeline(mma, context, split)(*views, allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _store(results, outs, out_smem, wg, rows, cols, epi_n, slots):
    """TMA-stores each (tm, tn) result in (EPI_M, epi_n) slices through double-buffered shared memory."""
    plgpu = lowering.plgpu()
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    step = 0
    for value, out in zip(results, outs):
        value = value.astype(out.dtype)
        for i in range(value.shape[0] // EPI_M):
            for j in range(value.shape[1] // epi_n):
                slot = step % slots
                step += 1
                plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
                out_smem[wg, slot] = value[i * EPI_M:(i + 1) * EPI_M, j * epi_n:(j + 1) * epi_n]
                plgpu.commit_smem()
                tile = out.at[rows, cols].at[pl.ds(i * EPI_M, EPI_M), pl.ds(j * epi_n, epi_n)]
                plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], tile)


def _operand_layout(a, trans_a, b, trans_b, interpret):
    """The operands as the kernel will read them. wgmma takes float32 (as TF32) only K-major, A as (M, K) and B
    as (N, K); the Mosaic GPU interpreter's wgmma has no transposed shared-memory views, so there every
    transpose is done by XLA (the transposed views are checked by lowering for CUDA instead)."""
    if interpret:
        return (a.T if trans_a else a), False, (b.T if trans_b else b), False
    if jnp.dtype(a.dtype).itemsize == 4:
        return (a.T if trans_a else a), False, (b if trans_b else b.T), True
    return a, trans_a, b, trans_b


def narrow_columns(b, trans_b: bool, n: int, a_size: int, interpret: bool):
    """(b, trans_b, narrow): whether each warpgroup may own only 32 columns (a 64-column CTA tile) for a narrow
    N <= 64, instead of wasting half the tile. A warpgroup's 32-column slice of a bfloat16 B stored (K, N) would
    cut its 128-byte swizzle rows (and a 64-byte swizzle fails Mosaic GPU's layout inference), so such a B is
    transposed by XLA to (N, K) first, when it is small next to A (a weight, not an activation gradient); float32
    rows are 32 elements, whole tiles either way."""
    if jnp.dtype(b.dtype).itemsize == 4:
        return b, trans_b, True
    if not trans_b and not interpret and n <= 64 and b.size * 8 <= a_size:
        return b.T, True, True
    return b, trans_b, trans_b


def gemm(a, b, bias=None, *, trans_a=False, trans_b=False, activation=None, save_z=False, out_dtype=None,
         blocks=None, interpret=None):
    """``act(op(a) @ op(b) + bias)`` on Mosaic GPU, and the pre-activation when ``save_z``.

    Returns (outputs, split): ``outputs`` the list [y] or [y, z]; when the reduction was split over work items,
    split=True and outputs is [Σ partials] in float32, to which the caller applies bias and activation.
    """
    if trans_a:
        k, m = a.shape
    else:
        m, k = a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    interpret = lowering.interpret_default(interpret)
    a, trans_a, b, trans_b = _operand_layout(a, trans_a, b, trans_b, interpret)
    b, trans_b, narrow = narrow_columns(b, trans_b, n, a.size, interpret)
    bl = tuning.mosaic_matmul_blocks(m, n, k, blocks, dtype=a.dtype, narrow_n=narrow)
    cta_n = _WGS * bl.tile_n
    m_iters, n_iters = -(-m // bl.tile_m), -(-n // cta_n)
    sms = lowering.num_sms(tuning.device_kind(), interpret)
    splits, per = split_k(m_iters * n_iters, -(-k // bl.tile_k), sms)
    kp = splits * per * bl.tile_k
    a = pad_axis(pad_axis(a, 0, kp if trans_a else bl.tile_m), 1, bl.tile_m if trans_a else kp)
    b = pad_axis(pad_axis(b, 0, cta_n if trans_b else kp), 1, kp if trans_b else cta_n)
    streams = (matrix_stream(bl.tile_m, bl.tile_k, per, k_minor=not trans_a, transposed=trans_a),
               matrix_stream(cta_n, bl.tile_k, per, k_minor=trans_b, transposed=trans_b))
    outs = launch(a, b, bias, streams, bl=bl, tiles=(m_iters, n_iters), splits=splits, k_iters=per,
                  activation=activation, save_z=save_z, out_dtype=out_dtype or a.dtype, interpret=interpret,
                  sms=sms, name="matmul_mgpu", useful_macs=m * n * k)
    if splits == 1:
        return [o[:m, :n] for o in outs], False
    return [outs[0][:m, :n]], True


def launch(a, b, bias, streams, *, bl, tiles, splits, k_iters, activation, save_z, out_dtype, interpret, sms,
           name, useful_macs):
    """Launches the GEMM kernel on operands already laid out and padded for ``streams`` (A's, B's): a
    (tiles[0]·tile_m, tiles[1]·2·tile_n) result, or with ``splits`` > 1 the float32 sum of the partials (bias
    and activation then left to the caller)."""
    if interpret and any(s.transposed for s in streams):  # it would deadlock there, not raise
        raise ValueError(f"{name}: the Mosaic GPU interpreter has no transposed shared-memory views; lay the "
                         f"operands out K-major for it (see _operand_layout)")
    m_iters, n_iters = tiles
    mp, np_ = m_iters * bl.tile_m, n_iters * _WGS * bl.tile_n
    fused = splits == 1
    args = [a, b]
    if bias is not None and fused:
        args.append(pad_axis(bias.reshape(1, -1), 1, np_))
    if fused:
        out_shape = [jax.ShapeDtypeStruct((mp, np_), jnp.dtype(out_dtype))] * (2 if save_z else 1)
    else:
        out_shape = [jax.ShapeDtypeStruct((splits * mp, np_), jnp.float32)]
    kernel = functools.partial(
        _kernel, bl=bl, a_stream=streams[0], b_stream=streams[1], activation=activation if fused else None,
        has_bias=bias is not None and fused, m_iters=m_iters, n_iters=n_iters, splits=splits, k_iters=k_iters)
    outs = lowering.launch_mosaic(kernel, out_shape=out_shape, sms=sms, name=name, interpret=interpret,
                                  macs=(useful_macs, mp * np_ * splits * k_iters * bl.tile_k))(*args)
    return outs if fused else [outs[0].reshape(splits, mp, np_).sum(axis=0)]
