"""2-D convolution (NHWC x HWIO -> NHWC) as implicit-GEMM Pallas kernels, forward and backward (Triton lowering).

    conv2d(x, w, strides, padding, dilation) == lax.conv_general_dilated(x, w, strides, padding,
                                                    rhs_dilation=dilation, ("NHWC", "HWIO", "NHWC"))

Forward: each program computes ``block_w`` output pixels of one output row x ``block_n`` output channels,
summing over the KH*KW taps (a static loop) and over input channels (a ``fori_loop`` of ``block_k`` at a
time) into a float32 accumulator with one ``dot`` per step. The image is never unfolded (no im2col):

* XLA glue zero-pads the input once (the conv's own padding, slack so that every in-kernel read is in
  bounds, channels up to a ``block_k`` multiple) and, for stride s > 1, splits it into s x s *phases*
  (``x_ph[p, q, n, i, j] = x_pad[n, i*s + p, j*s + q]``). Tap (kh, kw) of output row ``oh`` then reads a
  contiguous run of ``block_w`` columns of one phase, so strided convs need no strided loads.
* Input-gradient (dgrad): ``dx`` is a stride-1 conv of ``dy`` dilated by the stride and re-padded (XLA
  ``lax.pad`` with interior padding), with the kernel flipped spatially and its channels swapped: the same
  forward kernel.
* Weight-gradient (wgrad): one program per (tap, input-channel block, output-channel block, batch split)
  accumulates ``x_tapᵀ · dy`` over its share of output rows and column blocks inside the kernel; the
  per-split partial sums (float32) are added up in XLA. No output block is ever accumulated across a grid
  axis.

1x1 convolutions are a matmul over pixels and go to ``pallas_kernels.matmul`` (after striding/padding the
input in XLA). Grouped/depthwise convs (``feature_group_count != 1``) fall back to
``lax.conv_general_dilated``. ``precision`` is ignored: f32 inputs are multiplied in full f32 (IEEE) and
bf16 inputs in bf16, always with f32 accumulation.

File order: forward kernel, XLA glue, forward launch, backward (dgrad; wgrad kernel and launch), custom_vjp
wiring, public function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from fastgpu_jax.pallas_kernels import tuning
from fastgpu_jax.pallas_kernels.lowering import interpret_default, launch, pad_axis, round_up

_TN = (((0,), (0,)), ((), ()))  # (w, k)ᵀ @ (w, n)
# wgrad splits the batch reduction until about this many programs run (partials are summed in XLA).
_WGRAD_TARGET_PROGRAMS = 256

Pads = tuple[tuple[int, int], tuple[int, int]]


# --- forward kernel ---------------------------------------------------------------------------------------

def _forward_kernel(x_ref, w_ref, o_ref, *, taps, batch, hph, cin_pad, block_k):
    """out[n, oh, j*bw : (j+1)*bw, co-block] = Σ_taps Σ_cin x_phase[row, col window] · w[tap, cin, co-block].

    ``taps`` is a static tuple of (phase, row offset, column offset), one per (kh, kw); x_ref is the
    phase-split input flattened to (phases * N * Hph, Wph, Cin_pad); w_ref is (KH*KW*Cin_pad, block_n)."""
    n, oh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_w, block_n = o_ref.shape
    acc = jnp.zeros((block_w, block_n), jnp.float32)
    for t, (phase, dr, dc) in enumerate(taps):
        row = (phase * batch + n) * hph + oh + dr
        col0 = j * block_w + dc

        def body(c, acc, row=row, col0=col0, t=t):
            c0 = pl.multiple_of(c * block_k, block_k)
            a = x_ref[row, pl.ds(col0, block_w), pl.ds(c0, block_k)]
            b = w_ref[pl.ds(t * cin_pad + c0, block_k), :]
            return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, cin_pad // block_k, body, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


# --- geometry and XLA glue (shared) -----------------------------------------------------------------------

def _out_size(size: int, k: int, s: int, d: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - (k - 1) * d - 1) // s + 1


def _taps(ksize, strides, dilation) -> tuple[tuple[int, int, int], ...]:
    """(phase index, row offset, column offset) of each tap (kh, kw), in row-major tap order."""
    (kh, kw), (sh, sw), (dh, dw) = ksize, strides, dilation
    return tuple((((i * dh) % sh) * sw + (j * dw) % sw, (i * dh) // sh, (j * dw) // sw)
                 for i in range(kh) for j in range(kw))


def _phase_input(x, ksize, strides, dilation, pads, out_hw, cin_pad):
    """x (N,H,W,C) -> ((sh*sw*N*Hph, Wph, Cin_pad), Hph): padded, split into stride phases, flattened.

    Each phase holds ``out + (k-1)*d // s`` rows/columns: exactly what the taps of ``out`` outputs read, so
    every in-kernel read is in bounds (``out_hw`` already includes the block padding of the width). Pads
    may be negative (a crop), as in lax."""
    n, h, w, c = x.shape
    cfg, sizes = [(0, 0, 0)], []
    for size, k, s, d, (lo, _), out in zip((h, w), ksize, strides, dilation, pads, out_hw):
        ph = out + ((k - 1) * d) // s
        cfg.append((lo, ph * s - size - lo, 0))
        sizes.append(ph)
    xp = lax.pad(x, jnp.zeros((), x.dtype), (*cfg, (0, cin_pad - c, 0)))
    (sh, sw), (hph, wph) = strides, sizes
    if (sh, sw) != (1, 1):
        xp = xp.reshape(n, hph, sh, wph, sw, cin_pad).transpose(2, 4, 0, 1, 3, 5)
    return xp.reshape(sh * sw * n * hph, wph, cin_pad), hph


# --- forward launch ---------------------------------------------------------------------------------------

def _conv_forward(x, w, *, strides, pads, dilation, blocks, interpret, out_dtype):
    """The forward kernel on any shapes: pads to blocks, launches, slices the padding off."""
    n, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
    oh, ow = (_out_size(*a) for a in zip((h, wd), (kh, kw), strides, dilation, pads))
    b = blocks
    cin_pad, cout_pad, ow_pad = round_up(cin, b.block_k), round_up(cout, b.block_n), round_up(ow, b.block_w)
    xf, hph = _phase_input(x, (kh, kw), strides, dilation, pads, (oh, ow_pad), cin_pad)
    wf = pad_axis(pad_axis(w, 2, b.block_k), 3, b.block_n).reshape(kh * kw * cin_pad, cout_pad)
    kernel = functools.partial(_forward_kernel, taps=_taps((kh, kw), strides, dilation), batch=n, hph=hph,
                               cin_pad=cin_pad, block_k=b.block_k)
    out = launch(
        kernel, out_shape=jax.ShapeDtypeStruct((n, oh, ow_pad, cout_pad), out_dtype),
        grid=(n, oh, ow_pad // b.block_w, cout_pad // b.block_n),
        in_specs=[pl.BlockSpec(xf.shape, lambda *_: (0, 0, 0)),
                  pl.BlockSpec((wf.shape[0], b.block_n), lambda i, r, j, co: (0, co))],
        out_specs=pl.BlockSpec((None, None, b.block_w, b.block_n), lambda i, r, j, co: (i, r, j, co)),
        num_warps=b.num_warps, num_stages=b.num_stages, interpret=interpret, name="conv2d_fwd")(xf, wf)
    return out[:, :, :ow, :cout]


# --- backward: dgrad (the forward kernel again) and the wgrad kernel --------------------------------------

def _conv_dgrad(g, w, x_shape, *, strides, pads, dilation, blocks, interpret):
    """dx: the stride-1 conv of dy dilated by the stride, padded so the output is (N, H, W, Cin), with
    the kernel flipped spatially and in/out channels swapped (negative pads crop)."""
    _, h, wd, _ = x_shape
    kh, kw = w.shape[:2]
    oh, ow = g.shape[1:3]
    cfg = [(0, 0, 0)]
    for size, k, s, d, (lo, _), o in zip((h, wd), (kh, kw), strides, dilation, pads, (oh, ow)):
        cfg.append(((k - 1) * d - lo, size + lo - (o - 1) * s - 1, s - 1))
    gd = lax.pad(g, jnp.zeros((), g.dtype), (*cfg, (0, 0, 0)))
    wt = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    return _conv_forward(gd, wt, strides=(1, 1), pads=((0, 0), (0, 0)), dilation=dilation, blocks=blocks,
                         interpret=interpret, out_dtype=g.dtype)


def _wgrad_kernel(x_ref, g_ref, o_ref, *, kw, strides, dilation, batch, hph, out_h, rows_per, n_wblocks,
                  block_w):
    """dw[tap, ci-block, co-block] partial for one batch split = Σ_rows Σ_col-blocks x_tapᵀ · dy.

    The tap's phase and offsets are computed from program_id(0) with scalar arithmetic. Rows past N*OH
    (the last split's padding) read a clamped, valid x row against zero dy rows, so they add nothing."""
    t, sp = pl.program_id(0), pl.program_id(3)
    (sh, sw), (dh, dw) = strides, dilation
    ki, kj = t // kw, t % kw
    phase = ((ki * dh) % sh) * sw + (kj * dw) % sw
    dr, dc = (ki * dh) // sh, (kj * dw) // sw

    def row_step(i, acc):
        r = sp * rows_per + i
        n = jnp.minimum(r // out_h, batch - 1)
        xrow = (phase * batch + n) * hph + r % out_h + dr

        def col_step(j, acc):
            a = x_ref[xrow, pl.ds(j * block_w + dc, block_w), :]
            g = g_ref[r, pl.ds(j * block_w, block_w), :]
            return acc + lax.dot_general(a, g, _TN, preferred_element_type=jnp.float32)

        return lax.fori_loop(0, n_wblocks, col_step, acc)

    o_ref[...] = lax.fori_loop(0, rows_per, row_step, jnp.zeros(o_ref.shape, jnp.float32))


def _wgrad_splits(rows: int, base_programs: int) -> tuple[int, int]:
    """(splits, rows per split) of the N*OH output rows so that about _WGRAD_TARGET_PROGRAMS run."""
    splits = max(1, min(rows, -(-_WGRAD_TARGET_PROGRAMS // base_programs)))
    rows_per = -(-rows // splits)
    return -(-rows // rows_per), rows_per


def _conv_wgrad(x, g, w_shape, *, strides, pads, dilation, blocks, interpret):
    """dw (KH, KW, Cin, Cout) in the compute dtype: the wgrad kernel's per-split float32 partials, summed
    in XLA (one partial per batch split, so no program ever adds into another's output block)."""
    n, oh, ow, cout = g.shape
    kh, kw, cin, _ = w_shape
    b = blocks
    cin_pad, cout_pad, ow_pad = round_up(cin, b.block_k), round_up(cout, b.block_n), round_up(ow, b.block_w)
    xf, hph = _phase_input(x, (kh, kw), strides, dilation, pads, (oh, ow_pad), cin_pad)
    grid3 = (kh * kw, cin_pad // b.block_k, cout_pad // b.block_n)
    splits, rows_per = _wgrad_splits(n * oh, grid3[0] * grid3[1] * grid3[2])
    gf = pad_axis(pad_axis(g, 2, b.block_w), 3, b.block_n).reshape(n * oh, ow_pad, cout_pad)
    gf = pad_axis(gf, 0, splits * rows_per)
    kernel = functools.partial(_wgrad_kernel, kw=kw, strides=strides, dilation=dilation, batch=n, hph=hph,
                               out_h=oh, rows_per=rows_per, n_wblocks=ow_pad // b.block_w, block_w=b.block_w)
    parts = launch(
        kernel, out_shape=jax.ShapeDtypeStruct((splits, kh * kw, cin_pad, cout_pad), jnp.float32),
        grid=(*grid3, splits),
        in_specs=[pl.BlockSpec((xf.shape[0], xf.shape[1], b.block_k), lambda t, ci, co, s: (0, 0, ci)),
                  pl.BlockSpec((gf.shape[0], ow_pad, b.block_n), lambda t, ci, co, s: (0, 0, co))],
        out_specs=pl.BlockSpec((None, None, b.block_k, b.block_n), lambda t, ci, co, s: (s, t, ci, co)),
        num_warps=b.num_warps, num_stages=b.num_stages, interpret=interpret, name="conv2d_wgrad")(xf, gf)
    dw = parts.sum(axis=0).reshape(kh, kw, cin_pad, cout_pad)[:, :, :cin, :cout]
    return dw.astype(x.dtype)


# --- custom_vjp wiring ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one conv call (hashable: the custom_vjp's non-differentiable argument).
    Blocks and interpret mode are resolved when the forward is traced, so the backward uses the same
    choices even if it is traced outside a ``use_blocks`` context."""

    strides: tuple[int, int]
    pads: Pads
    dilation: tuple[int, int]
    fwd_blocks: tuning.ConvBlocks
    dgrad_blocks: tuning.ConvBlocks
    interpret: bool
    out_dtype: Any

    def geometry(self):
        return dict(strides=self.strides, pads=self.pads, dilation=self.dilation, interpret=self.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, cfg: _Config):
    """The differentiable kernel conv: ``jax.grad`` cannot go through ``pallas_call`` itself."""
    return _conv_forward(x, w, blocks=cfg.fwd_blocks, out_dtype=cfg.out_dtype, **cfg.geometry())


def _conv_fwd(x, w, cfg: _Config):
    return _conv(x, w, cfg), (x, w)


def _conv_bwd(cfg: _Config, res, g):
    """dy is cast to the compute dtype (that of x and w) before both backward kernels."""
    x, w = res
    g = g.astype(x.dtype)
    dx = _conv_dgrad(g, w, x.shape, blocks=cfg.dgrad_blocks, **cfg.geometry())
    dw = _conv_wgrad(x, g, w.shape, blocks=cfg.fwd_blocks, **cfg.geometry())
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


# --- public function --------------------------------------------------------------------------------------

def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(a) for a in v)


def _explicit_pads(in_hw, k_hw, strides, dilation, padding) -> Pads:
    """((lo, hi), (lo, hi)) exactly as lax.conv_general_dilated resolves ``padding`` (SAME uses the
    dilated kernel size)."""
    if isinstance(padding, str):
        eff = [(k - 1) * d + 1 for k, d in zip(k_hw, dilation)]
        padding = lax.padtype_to_pads(in_hw, eff, strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pads) != 2:
        raise ValueError(f"conv2d padding needs two (lo, hi) pairs (H, W), got {padding!r}")
    return pads


def _pointwise(x, w, *, strides, pads, out_dtype, interpret):
    """A 1x1 conv is a matmul over pixels: pad/crop and stride x in XLA, then (..., Cin) @ (Cin, Cout)."""
    if any(p != 0 for pair in pads for p in pair):
        x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    x = x[:, ::strides[0], ::strides[1]]
    from fastgpu_jax.pallas_kernels.matmul import matmul  # noqa: PLC0415 (kept lazy: sibling module)
    return matmul(x, w.reshape(w.shape[2], w.shape[3]), out_dtype=out_dtype, interpret=interpret)


def conv2d(x, w, *, strides=(1, 1), padding="SAME", dilation=(1, 1), feature_group_count=1,
           precision=None, preferred_element_type=None, blocks=None, interpret=None):
    """NHWC x (N,H,W,Cin) * HWIO w (KH,KW,Cin,Cout) -> NHWC (N,OH,OW,Cout), dtype of x (or preferred_element_type).

    Same semantics as ``lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"))``: ``padding`` is "SAME", "VALID" or ((lo, hi), (lo, hi));
    ``strides``/``dilation`` are positive ints (or pairs). Differentiable (custom_vjp; the backward is Pallas
    too). 1x1 kernels run on the Pallas matmul. ``feature_group_count != 1`` (grouped/depthwise) is not
    implemented as a kernel and falls back to ``lax.conv_general_dilated``. ``precision`` is ignored (the
    kernels accumulate in f32). ``blocks`` (a ``tuning.ConvBlocks``) overrides the tuning table;
    ``interpret=None`` runs the Pallas interpreter on CPU and the GPU kernels elsewhere.
    """
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d expects NHWC x and HWIO w, got shapes {x.shape} and {w.shape}")
    strides, dilation = _pair(strides), _pair(dilation)
    if feature_group_count != 1:
        dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        return lax.conv_general_dilated(x, w, window_strides=strides, padding=padding, rhs_dilation=dilation,
                                        dimension_numbers=dn, feature_group_count=feature_group_count,
                                        precision=precision, preferred_element_type=preferred_element_type)
    if x.shape[3] != w.shape[2]:
        raise ValueError(f"conv2d: x has {x.shape[3]} channels but w expects {w.shape[2]} (shape {w.shape})")
    if min(strides) < 1 or min(dilation) < 1:
        raise ValueError(f"conv2d strides and dilation must be positive, got {strides} and {dilation}")
    pads = _explicit_pads(x.shape[1:3], w.shape[:2], strides, dilation, padding)
    out_hw = [_out_size(*a) for a in zip(x.shape[1:3], w.shape[:2], strides, dilation, pads)]
    if min(out_hw) < 1:
        raise ValueError(f"conv2d output would be empty: x {x.shape}, w {w.shape}, padding {pads}")
    dtype = jnp.promote_types(x.dtype, w.dtype)
    out_dtype = jnp.dtype(dtype if preferred_element_type is None else preferred_element_type)
    x, w = x.astype(dtype), w.astype(dtype)
    interpret = interpret_default(interpret)
    if w.shape[:2] == (1, 1):
        return _pointwise(x, w, strides=strides, pads=pads, out_dtype=out_dtype, interpret=interpret)
    cin, cout = w.shape[2:]
    cfg = _Config(strides=strides, pads=pads, dilation=dilation, interpret=interpret, out_dtype=out_dtype,
                  fwd_blocks=tuning.conv_blocks(out_hw[1], cin, cout, blocks),
                  dgrad_blocks=tuning.conv_blocks(x.shape[2], cout, cin, blocks))
    return _conv(x, w, cfg)
