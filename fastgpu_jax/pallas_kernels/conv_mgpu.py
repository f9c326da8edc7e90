"""The conv's Mosaic GPU (Hopper) body: implicit GEMM on the matmul's warp-specialised kernel (``matmul_mgpu``).

``conv2d.py`` owns the routing, the sub-pixel dgrad and the custom_vjp and calls ``forward`` / ``wgrad`` here
instead of its Triton kernels when ``lowering.chosen("conv2d", ...)`` says "mosaic"; the input gradient is
``forward`` on dy with the kernel flipped (once per sub-pixel phase for a strided conv), as on the Triton path.

**Why a different layout from the Triton body.** Triton gathers A rows one by one (``base[m] + offset[tap]``);
Mosaic GPU loads A with TMA, one rectangular box per K step, so every tap of an output tile must read a
*contiguous* run of input rows. The input is laid out as rows of channels in **HWNC** order, padded, and (for a
stride s) split into s x s sub-pixel **phases**::

    rows[((a·s_w + b)·Hq + u)·Wq·Nb + v·Nb + n] = x_padded[n, s_h·u + a, s_w·v + b]      (Nb = batch padded)

Output pixel (n, oh, ow) is the *virtual* row r = (oh·Wq + ow)·Nb + n, and tap (kh, kw) reads input row
r + offset[tap] for every r: one contiguous box per (tap, channel block), the offsets static. The batch is the
fastest index so that every offset is a multiple of Nb, itself a multiple of 8: a TMA box into an 8-row-tiled,
swizzled tile must start on a tile row (TMA zero-fills a box that straddles the tiled dimension, so a 1-row
shift would silently read zeros on a GPU). The float32 weight gradient, whose TF32 wgmma wants its operands
pixel-minor, pads the batch to a multiple of 32 (a 128-byte swizzle row of pixels).

Costs of the layout, paid in XLA: one pass to write ``rows`` (the Triton path pads too) and one to turn the
virtual HWNC output back into NHWC; virtual rows with ow >= OW (Wq/OW of the work: 1.04 at 56x56, 1.14 at
14x14, 1.29 at 7x7 for a 3x3 SAME conv) and images past N (up to Nb) are computed and discarded.

* **forward**: M = virtual output rows, N = Cout, K = (tap, channel block) in one loop; A's block row is an
  element offset (``pl.Element``), so a K step is one TMA box at ``tile start + offset[tap]``. When the output
  tiles are fewer than the SMs (a small batch), the steps are split over work items (float32 partials).
* **wgrad**: M = (tap, input channel), N = Cout, K = virtual pixels (dy laid out the same way, zero on the
  discarded rows, so they add nothing); the tap's offset shifts the A view of a whole output tile; split-K over
  pixel ranges fills the SMs (float32 partials summed by XLA, as on the Triton path).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fastgpu_jax.pallas_kernels import lowering, tuning
from fastgpu_jax.pallas_kernels.lowering import pad_axis, round_up
from fastgpu_jax.pallas_kernels.matmul_mgpu import _WGS, Stream, _operand_layout, launch, matrix_stream, split_k


@dataclasses.dataclass(frozen=True)
class Layout:
    """The phased HWNC row layout of one conv's input (see the module docstring)."""

    nb: int  # images per pixel position (the batch padded)
    grid: tuple[int, int]  # (Hq, Wq): one phase's rows and columns
    out_hw: tuple[int, int]
    offsets: tuple[int, ...]  # input rows between virtual output row r and what tap t reads, per tap

    @property
    def virtual(self) -> int:
        """Virtual output rows: OH x Wq x Nb (columns past OW and images past N are discarded)."""
        return self.out_hw[0] * self.grid[1] * self.nb

    @property
    def span(self) -> int:
        return max(self.offsets)


def batch_align(dtype, interpret: bool, pixels_minor: bool) -> int:
    """Nb's multiple: 8 (one tile row of the 8-row TMA tiling); 32 for the float32 weight gradient on a GPU,
    which reads pixels as the minor (128-byte swizzled) dimension. The interpreter checks no alignment."""
    return 32 if pixels_minor and jnp.dtype(dtype).itemsize == 4 and not interpret else 8


def layout(x_shape, w_shape, strides, pads, dilation, align: int) -> Layout:
    n, h, wd, _ = x_shape
    kh, kw = w_shape[:2]
    (sh, sw), (dh, dw) = strides, dilation
    hp, wp = h + pads[0][0] + pads[0][1], wd + pads[1][0] + pads[1][1]
    oh, ow = (hp - (kh - 1) * dh - 1) // sh + 1, (wp - (kw - 1) * dw - 1) // sw + 1
    hq, wq, nb = -(-hp // sh), -(-wp // sw), round_up(n, align)
    offsets = tuple((((i * dh) % sh * sw + (j * dw) % sw) * hq + (i * dh) // sh) * wq * nb + (j * dw) // sw * nb
                    for i in range(kh) for j in range(kw))
    return Layout(nb, (hq, wq), (oh, ow), offsets)


def _rows(x, lay: Layout, strides, pads, channels: int, min_rows: int):
    """x (N, H, W, C) -> the phased HWNC rows (s_h·s_w·Hq·Wq·Nb, channels), zero-padded to ``min_rows``."""
    n, h, wd, c = x.shape
    (hq, wq), (sh, sw) = lay.grid, strides
    extra = [hq * sh - (h + sum(pads[0])), wq * sw - (wd + sum(pads[1]))]  # phase grid rounding, >= 0
    cfg = ((0, lay.nb - n, 0), (pads[0][0], pads[0][1] + extra[0], 0), (pads[1][0], pads[1][1] + extra[1], 0),
           (0, channels - c, 0))
    xp = lax.pad(x, jnp.zeros((), x.dtype), cfg)
    rows = xp.reshape(lay.nb, hq, sh, wq, sw, channels).transpose(2, 4, 1, 3, 0, 5).reshape(-1, channels)
    return jnp.pad(rows, ((0, max(0, min_rows - rows.shape[0])), (0, 0)))


def _tap_offset(tap, offsets):
    """offsets[tap] for a traced tap index (a chain of selects over the static table)."""
    off = jnp.int32(offsets[0])
    for t, o in enumerate(offsets[1:], 1):
        off = lax.select(tap == t, jnp.int32(o), off)
    return off


def forward(x, w, *, strides, pads, dilation, blocks, interpret, out_dtype):
    """y (N, OH, OW, Cout) = conv(x, w) on the Mosaic GPU GEMM; ``blocks`` the table's (unfitted) entry."""
    kh, kw, cin, cout = w.shape
    n = x.shape[0]
    lay = layout(x.shape, w.shape, strides, pads, dilation, batch_align(x.dtype, interpret, pixels_minor=False))
    # 32-column warpgroup tiles: float32 rows are whole tiles; bfloat16 needs the (small) weights read (Cout, K),
    # which the interpreter (no transposed views) cannot do.
    narrow = jnp.dtype(x.dtype).itemsize == 4 or not interpret
    bl = tuning.fit_mosaic(blocks, lay.virtual, cout, cin, x.dtype, narrow)
    tm, tk, cta_n = bl.tile_m, bl.tile_k, _WGS * bl.tile_n
    cp = round_up(cin, tk)
    cblocks, taps = cp // tk, kh * kw
    m_iters, n_iters = -(-lay.virtual // tm), -(-cout // cta_n)
    sms = lowering.num_sms(tuning.device_kind(), interpret)
    splits, per = split_k(m_iters * n_iters, taps * cblocks, sms)  # few tiles (a small batch): split the taps
    rows = _rows(x, lay, strides, pads, cp, m_iters * tm + lay.span)
    wf = pad_axis(pad_axis(w, 2, tk), 3, cta_n).reshape(taps * cp, -1)
    wf = pad_axis(wf, 0, splits * per * tk)  # steps past the last tap read real rows times zero weights
    rows, _, wf, trans_b = _operand_layout(rows, False, wf, False, interpret)  # float32 B: (Cout, K)
    if bl.tile_n < 64 and not trans_b and not interpret:
        wf, trans_b = wf.T, True  # bfloat16 32-column warpgroup tiles: see matmul_mgpu.narrow_columns
    offsets = lay.offsets

    def a_index(k, split):  # the global step's tap shifts the block's first row; its channel block is the column
        step = split * per + k
        return _tap_offset(step // cblocks, offsets), step % cblocks

    a_stream = Stream(block=(pl.Element(tm), tk), index=a_index,
                      view=lambda g, mi, split: g.at[pl.ds(mi * tm, tm + lay.span), :], transposed=False)
    b_stream = matrix_stream(cta_n, tk, per, k_minor=trans_b, transposed=trans_b)
    (out,) = launch(rows, wf, None, (a_stream, b_stream), bl=bl, tiles=(m_iters, n_iters), splits=splits,
                    k_iters=per, activation=None, save_z=False, out_dtype=out_dtype, interpret=interpret, sms=sms,
                    name="conv2d_fwd_mgpu", useful_macs=n * lay.out_hw[0] * lay.out_hw[1] * cout * taps * cin)
    (oh, ow), wq = lay.out_hw, lay.grid[1]
    out = out[:lay.virtual].reshape(oh, wq, lay.nb, -1)[:, :ow, :n, :cout].transpose(2, 0, 1, 3)
    return out.astype(out_dtype)


def wgrad(x, g, w_shape, *, strides, pads, dilation, blocks, interpret):
    """dw (KH, KW, Cin, Cout) in x's dtype from dy = g (N, OH, OW, Cout)."""
    kh, kw, cin, cout = w_shape
    n = x.shape[0]
    lay = layout(x.shape, w_shape, strides, pads, dilation, batch_align(x.dtype, interpret, pixels_minor=True))
    k_major = interpret or jnp.dtype(x.dtype).itemsize == 4
    bl = tuning.fit_mosaic(blocks, cin, cout, lay.virtual, x.dtype, narrow_n=jnp.dtype(x.dtype).itemsize == 4)
    tm, tk, cta_n = bl.tile_m, bl.tile_k, _WGS * bl.tile_n
    cp, taps = round_up(cin, tm), kh * kw
    cblocks = cp // tm
    m_iters, n_iters = taps * cblocks, -(-cout // cta_n)
    sms = lowering.num_sms(tuning.device_kind(), interpret)
    splits, per = split_k(m_iters * n_iters, -(-lay.virtual // tk), sms)
    kp = splits * per * tk
    rows = _rows(x, lay, strides, pads, cp, kp + lay.span)
    (oh, ow), wq = lay.out_hw, lay.grid[1]
    dy = jnp.pad(g, ((0, lay.nb - n), (0, 0), (0, wq - ow), (0, n_iters * cta_n - cout)))
    dy = pad_axis(dy.transpose(1, 2, 0, 3).reshape(lay.virtual, -1), 0, kp)
    # wgmma reads float32 only K-major, and the interpreter has no transposed views: there both operands are
    # stored pixel-minor (x and dy transposed by XLA); bfloat16 on a GPU reads them as laid out (dy as (K, N),
    # hence no 32-column warpgroup tiles for bfloat16: see matmul_mgpu.narrow_columns).
    offsets = lay.offsets

    def a_view(gmem, mi, split):
        start = split * per * tk + _tap_offset(mi // cblocks, offsets)
        chans, pixels = pl.ds(mi % cblocks * tm, tm), pl.ds(start, per * tk)
        return gmem.at[chans, pixels] if k_major else gmem.at[pixels, chans]

    if k_major:
        rows = rows.T
        a_stream = Stream((tm, tk), lambda k, split: (0, k), a_view, transposed=False)
    else:
        a_stream = Stream((tk, tm), lambda k, split: (k, 0), a_view, transposed=True)
    trans_b = k_major and not interpret  # float32 on a GPU: dy as (Cout, pixels)
    b_stream = matrix_stream(cta_n, tk, per, k_minor=trans_b, transposed=trans_b)
    (dw,) = launch(rows, dy.T if trans_b else dy, None, (a_stream, b_stream), bl=bl, tiles=(m_iters, n_iters),
                   splits=splits, k_iters=per, activation=None, save_z=False, out_dtype=x.dtype, interpret=interpret,
                   sms=sms, name="conv2d_wgrad_mgpu", useful_macs=n * oh * ow * cout * taps * cin)
    return dw.reshape(kh, kw, cp, -1)[:, :, :cin, :cout].astype(x.dtype)
