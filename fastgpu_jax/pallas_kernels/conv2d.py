"""2-D convolution (NHWC x HWIO -> NHWC) as implicit-GEMM Pallas kernels, forward and backward.

    conv2d(x, w, strides, padding, dilation) == lax.conv_general_dilated(x, w, strides, padding,
                                                    rhs_dilation=dilation, ("NHWC", "HWIO", "NHWC"))

**Forward** (``_forward_kernel``): a GEMM whose M runs over the output pixels (n, oh, ow) *jointly*, N over
output channels and K over (tap, input-channel block) in **one flattened loop**. The padded input is viewed
as rows of channels, (N*Hp*Wp, Cp); output pixel m of tap t reads row ``base[m] + offset[t]``, so the A tile
of a step is a row gather of ``block_m`` contiguous channel runs and the B tile is rows ``k*block_k`` of the
packed weights (KH*KW*Cp, Cout). Nothing is unrolled per tap (a 7x7 kernel is a 49*Cp/block_k-step loop that
Triton pipelines like any matmul), a 7x7 feature map wastes nothing on row padding, and strides and dilation
are only arithmetic in ``base`` and ``offset``. The image is never unfolded in memory.

**Input gradient** (dgrad): for stride 1 it is the forward kernel on dy with the kernel flipped and its
channels swapped. For stride s > 1 it is split into s x s **sub-pixel** phases: the input pixels with
h = s*u + a receive dy only through the taps kh = a + pad (mod s), so each phase is a stride-1 conv of dy
with that sub-kernel (no MAC touches an inserted zero); the phases are interleaved in XLA.

**Weight gradient** (``_wgrad_kernel``): a GEMM per tap, M = input channels, N = output channels, K = output
pixels (the same row gather, transposed), split over pixel ranges with float32 partials summed in XLA when
the (tap, channel) tiles alone are too few programs to fill the GPU.

Routed elsewhere, each because a GEMM formulation is simply better there:
* 1x1 convs are a matmul over pixels (``pallas_kernels.matmul``), after striding/padding in XLA;
* "patchify" convs (stride = kernel size, no padding or dilation: ViT's patch embedding) are a reshape and
  a matmul with K = KH*KW*Cin;
* convs with fewer than ``GATHER_MIN_CIN`` input channels (the 3-channel stem) fold (kh, kw, cin) into K by
  an XLA unfold (K = 147 for a 7x7 RGB stem, 8% padding instead of 81%) and run on the matmul;
* grouped/depthwise convs (``feature_group_count != 1``) fall back to ``lax.conv_general_dilated``.

``precision`` is ignored: float32 inputs are multiplied in float32 (TF32 on a GPU at default precision)
and bfloat16 in bfloat16, always with float32 accumulation.

**Lowerings.** The kernels below are the Triton bodies. On Hopper the forward (hence also the input gradient)
and weight-gradient GEMMs run on Mosaic GPU instead (``conv_mgpu.py``: the same implicit GEMM, laid out for
TMA), chosen once per call by ``chosen_lowering`` (``lowering.chosen``) and kept for the backward; routing and
the sub-pixel dgrad are shared.

File order: kernels, geometry and XLA glue, launches, sub-pixel dgrad, custom_vjp wiring, public function.
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

from fastgpu_jax.pallas_kernels import conv_mgpu, lowering, tuning
from fastgpu_jax.pallas_kernels.lowering import div_mod, interpret_default, launch, pad_axis, round_up
from fastgpu_jax.pallas_kernels.matmul import grouped, matmul, reduce_steps, splits_for

GATHER_MIN_CIN = 16  # below this, the conv is unfolded into a matmul (the RGB stem)
SMEM_BUDGET = 200 * 1024  # pipelined operand tiles per program, under an H100 block's 227 KB
_TN = (((0,), (0,)), ((), ()))  # (p, k)ᵀ @ (p, n)

Pads = tuple[tuple[int, int], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Where output pixel m and tap t read in the padded input viewed as rows (N*Hp*Wp, Cp)."""

    pixels: int  # N * OH * OW
    out_hw: tuple[int, int]
    in_hw: tuple[int, int]  # (Hp, Wp), the padded input
    strides: tuple[int, int]
    taps_hw: tuple[int, int]  # taps per row and column (KH, KW)
    tap_step: tuple[int, int]  # input rows/columns between neighbouring taps (the dilation)

    def base(self, m):
        """Input row of tap (0, 0) for output pixels m (clamped into range: padded pixels are discarded)."""
        (oh, ow), (hp, wp), (sh, sw) = self.out_hw, self.in_hw, self.strides
        n, r = div_mod(jnp.minimum(m, self.pixels - 1), oh * ow)
        row, col = div_mod(r, ow)
        return n * (hp * wp) + row * (sh * wp) + col * sw

    def offset(self, t):
        """Row offset of tap t (row-major over the KH x KW taps)."""
        (dh, dw), wp = self.tap_step, self.in_hw[1]
        row, col = div_mod(t, self.taps_hw[1])
        return row * (dh * wp) + col * dw


# --- kernels ----------------------------------------------------------------------------------------------

def _forward_kernel(x_ref, w_ref, o_ref, *, geo: _Geometry, tiles: tuple[int, int], bk: int, cblocks: int):
    """out[m-block, n-block] = Σ_k x[base[m] + offset[k // cblocks], cblock k % cblocks] · w[k-th block]."""
    i, _ = grouped(pl.program_id(0), *tiles)
    bm = o_ref.shape[0]
    base = geo.base(i * bm + lax.iota(jnp.int32, bm))

    def step(k):
        tap, cblock = div_mod(k, cblocks)
        c0 = 0 if cblocks == 1 else pl.multiple_of(cblock * bk, bk)
        a = x_ref[base + geo.offset(tap), pl.ds(c0, bk)]
        return jnp.dot(a, w_ref[pl.ds(pl.multiple_of(k * bk, bk), bk), :], preferred_element_type=jnp.float32)

    steps = geo.taps_hw[0] * geo.taps_hw[1] * cblocks
    o_ref[...] = reduce_steps(step, steps, steps, o_ref.shape).astype(o_ref.dtype)


def _wgrad_kernel(x_ref, g_ref, o_ref, *, geo: _Geometry, cblocks: int, couts: int, bp: int, steps: int,
                  per: int, dy_t: bool):
    """dw partial [tap, cin-block, cout-block] = Σ_pixels x[base[p] + offset[tap], cin-block]ᵀ · dy[p, cout-block]
    over this program's split of the pixel blocks (pixels past N*OH*OW have zero dy rows). With ``dy_t``
    (float32) dy arrives transposed, (Cout, pixels), and the tile computed is dwᵀ = dyᵀ · x: Hopper's TF32
    wgmma takes its A operand only K-major, and pixel-major x or dy would fall back to mma.sync."""
    off = geo.offset(div_mod(div_mod(pl.program_id(0), couts)[0], cblocks)[0])

    def step(q):
        p0 = pl.multiple_of(q * bp, bp)
        a = x_ref[geo.base(p0 + lax.iota(jnp.int32, bp)) + off, :]
        if dy_t:
            return jnp.dot(g_ref[:, pl.ds(p0, bp)], a, preferred_element_type=jnp.float32)
        return lax.dot_general(a, g_ref[pl.ds(p0, bp), :], _TN, preferred_element_type=jnp.float32)

    o_ref[...] = reduce_steps(step, per, steps, o_ref.shape)


# --- geometry and XLA glue --------------------------------------------------------------------------------

def _out_size(size: int, k: int, s: int, d: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - (k - 1) * d - 1) // s + 1


def _rows(x, pads, cin_pad):
    """x (N,H,W,C) padded spatially by ``pads`` (negative pads crop, as in lax) and in channels up to
    ``cin_pad``, viewed as rows (N*Hp*Wp, cin_pad); also returns (Hp, Wp)."""
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, cin_pad - x.shape[3], 0)))
    n, hp, wp, c = xp.shape
    return xp.reshape(n * hp * wp, c), (hp, wp)


def _geometry(x_shape, w_shape, strides, pads, dilation):
    n, h, wd, _ = x_shape
    kh, kw = w_shape[:2]
    out_hw = tuple(_out_size(*a) for a in zip((h, wd), (kh, kw), strides, dilation, pads))
    in_hw = tuple(size + lo + hi for size, (lo, hi) in zip((h, wd), pads))
    return _Geometry(n * out_hw[0] * out_hw[1], out_hw, in_hw, tuple(strides), (kh, kw), tuple(dilation))


# --- launches ---------------------------------------------------------------------------------------------

def _conv_forward(x, w, *, strides, pads, dilation, blocks, interpret, out_dtype, mosaic=None):
    """The forward kernel on any shapes: pads to blocks, launches, slices the padding off. With ``mosaic``
    (the Mosaic GPU tiles) the Mosaic GPU body runs it instead."""
    if mosaic is not None:
        return conv_mgpu.forward(x, w, strides=strides, pads=pads, dilation=dilation, blocks=mosaic,
                                 interpret=interpret, out_dtype=out_dtype)
    geo = _geometry(x.shape, w.shape, strides, pads, dilation)
    kh, kw, cin, cout = w.shape
    b = blocks
    cin_pad = round_up(cin, b.block_k)
    xf, _ = _rows(x, pads, cin_pad)
    wf = pad_axis(pad_axis(w, 2, b.block_k), 3, b.block_n).reshape(kh * kw * cin_pad, -1)
    mp, cout_pad = round_up(geo.pixels, b.block_m), wf.shape[1]
    tiles = (mp // b.block_m, cout_pad // b.block_n)
    kernel = functools.partial(_forward_kernel, geo=geo, tiles=tiles, bk=b.block_k, cblocks=cin_pad // b.block_k)
    out = launch(
        kernel, out_shape=jax.ShapeDtypeStruct((mp, cout_pad), out_dtype), grid=(tiles[0] * tiles[1],),
        in_specs=[pl.BlockSpec(xf.shape, lambda p: (0, 0)),
                  pl.BlockSpec((wf.shape[0], b.block_n), lambda p: (0, grouped(p, *tiles)[1]))],
        out_specs=pl.BlockSpec((b.block_m, b.block_n), lambda p: grouped(p, *tiles)),
        num_warps=b.num_warps, num_stages=b.num_stages, interpret=interpret, name="conv2d_fwd",
        macs=(geo.pixels * cout * kh * kw * cin, mp * cout_pad * kh * kw * cin_pad))(xf, wf)
    return out[:geo.pixels, :cout].reshape(x.shape[0], *geo.out_hw, cout)


def _conv_wgrad(x, g, w_shape, *, strides, pads, dilation, blocks, interpret, mosaic=None):
    """dw (KH, KW, Cin, Cout) in the compute dtype from the wgrad kernel's float32 partials (on Mosaic GPU
    with ``mosaic``)."""
    if mosaic is not None:
        return conv_mgpu.wgrad(x, g, w_shape, strides=strides, pads=pads, dilation=dilation, blocks=mosaic,
                               interpret=interpret)
    geo = _geometry(x.shape, w_shape, strides, pads, dilation)
    kh, kw, cin, cout = w_shape
    b = blocks
    bk, bn, bp = b.block_k, b.block_n, b.block_m  # tile cin x cout; reduce block_m pixels per step
    while bp > 32 and b.num_stages * bp * (bk + bn) * x.dtype.itemsize > SMEM_BUDGET:
        bp //= 2  # f32 tiles of 128 pixels x (32 + 128) channels x 3 stages would need 240 KB
    cin_pad = round_up(cin, bk)
    xf, _ = _rows(x, pads, cin_pad)
    gf = pad_axis(pad_axis(g.reshape(geo.pixels, cout), 0, bp), 1, bn)
    cblocks, couts = cin_pad // bk, gf.shape[1] // bn
    tiles, steps = kh * kw * cblocks * couts, gf.shape[0] // bp
    splits, per = splits_for(tiles, steps)
    dy_t = x.dtype == jnp.float32  # see _wgrad_kernel: one XLA transpose of dy buys TF32 wgmma
    kernel = functools.partial(_wgrad_kernel, geo=geo, cblocks=cblocks, couts=couts, bp=bp, steps=steps, per=per,
                               dy_t=dy_t)
    x_spec = pl.BlockSpec((xf.shape[0], bk), lambda p, s: (0, div_mod(div_mod(p, couts)[0], cblocks)[1]))
    if dy_t:
        gf = gf.T
        g_spec = pl.BlockSpec((bn, gf.shape[1]), lambda p, s: (div_mod(p, couts)[1], 0))
        out = jax.ShapeDtypeStruct((splits, gf.shape[0], kh * kw * cin_pad), jnp.float32)
        out_spec = pl.BlockSpec((None, bn, bk), lambda p, s: (s, div_mod(p, couts)[1], div_mod(p, couts)[0]))
    else:
        g_spec = pl.BlockSpec((gf.shape[0], bn), lambda p, s: (0, div_mod(p, couts)[1]))
        out = jax.ShapeDtypeStruct((splits, kh * kw * cin_pad, gf.shape[1]), jnp.float32)
        out_spec = pl.BlockSpec((None, bk, bn), lambda p, s: (s, *div_mod(p, couts)))
    parts = launch(
        kernel, out_shape=out, grid=(tiles, splits), in_specs=[x_spec, g_spec], out_specs=out_spec,
        num_warps=b.num_warps, num_stages=b.num_stages, interpret=interpret, name="conv2d_wgrad",
        macs=(geo.pixels * cout * kh * kw * cin, steps * bp * couts * bn * kh * kw * cin_pad))(xf, gf)
    dw = parts.sum(axis=0)
    dw = (dw.T if dy_t else dw).reshape(kh, kw, cin_pad, -1)[:, :, :cin, :cout]
    return dw.astype(x.dtype)


# --- input gradient ---------------------------------------------------------------------------------------

def _phase_taps(a: int, size: int, k: int, s: int, lo: int, out: int):
    """For input positions i = s*u + a: (kernel taps reaching them, in reverse, pads of dy, phase length).

    Forward: y[o] = Σ_k x[o*s + k - lo] w[k], so x[s*u + a] receives y[o] w[k] for k = k0 (mod s),
    k0 = (a + lo) mod s, at o = u + c - j for k = k0 + s*j, c = (a + lo - k0) / s. Reversing j makes it the
    stride-1 correlation Σ_j' dy_pad[u + j'] w[k0 + s*(J-1-j')] with dy padded by J-1-c in front."""
    k0 = (a + lo) % s
    taps = list(range(k0, k, s))[::-1]
    length = max(0, -(-(size - a) // s))
    if not taps or length == 0:
        return [], None, length
    c = (a + lo - k0) // s
    front = len(taps) - 1 - c
    return taps, (front, length + len(taps) - 1 - out - front), length


def _conv_dgrad(g, w, x_shape, *, strides, pads, dilation, blocks, interpret, mosaic=None):
    """dx (N, H, W, Cin) from dy (N, OH, OW, Cout): the forward kernel with the kernel flipped and its
    channels swapped; for stride > 1 once per sub-pixel phase, interleaved here."""
    n, h, wd, cin = x_shape
    kh, kw = w.shape[:2]
    oh, ow = g.shape[1:3]
    wt = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    run = functools.partial(_conv_forward, blocks=blocks, interpret=interpret, out_dtype=g.dtype, mosaic=mosaic)
    if strides == (1, 1):
        back = tuple(((k - 1) * d - lo, size + lo - o)
                     for size, k, d, (lo, _), o in zip((h, wd), (kh, kw), dilation, pads, (oh, ow)))
        return run(g, wt, strides=(1, 1), pads=back, dilation=dilation)
    if dilation != (1, 1):  # strided and dilated: dy dilated by the stride with zeros (rare; correct, slower)
        cfg = [((k - 1) * d - lo, size + lo - (o - 1) * s - 1, s - 1)
               for size, k, s, d, (lo, _), o in zip((h, wd), (kh, kw), strides, dilation, pads, (oh, ow))]
        gd = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), *cfg, (0, 0, 0)))
        return run(gd, wt, strides=(1, 1), pads=((0, 0), (0, 0)), dilation=dilation)
    (sh, sw), (lh, lw) = strides, (pads[0][0], pads[1][0])
    ph, pw = -(-h // sh), -(-wd // sw)
    phases = []
    for a in range(sh):
        rows, row_pads, hu = _phase_taps(a, h, kh, sh, lh, oh)
        for b in range(sw):
            cols, col_pads, wv = _phase_taps(b, wd, kw, sw, lw, ow)
            if rows and cols:
                sub = w[np.array(rows)][:, np.array(cols)].transpose(0, 1, 3, 2)
                part = run(g, sub, strides=(1, 1), pads=(row_pads, col_pads), dilation=(1, 1))
            else:  # no tap reaches these input pixels (e.g. a 1x1 kernel with stride 2)
                part = jnp.zeros((n, hu, wv, cin), g.dtype)
            phases.append(jnp.pad(part, ((0, 0), (0, ph - hu), (0, pw - wv), (0, 0))))
    dx = jnp.stack(phases).reshape(sh, sw, n, ph, pw, cin).transpose(2, 3, 0, 4, 1, 5)
    return dx.reshape(n, ph * sh, pw * sw, cin)[:, :h, :wd]


# --- custom_vjp wiring ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one conv call (hashable: the custom_vjp's non-differentiable argument).
    Blocks and interpret mode are resolved when the forward is traced, so the backward uses the same
    choices even if it is traced outside a ``use_blocks`` context."""

    strides: tuple[int, int]
    pads: Pads
    dilation: tuple[int, int]
    fwd_blocks: tuning.ConvBlocks  # the forward's, and the weight gradient's (the same GEMM, transposed)
    dgrad_blocks: tuning.ConvBlocks
    interpret: bool
    out_dtype: Any
    mosaic_fwd: tuning.MosaicMatmulBlocks | None = None  # set: the conv runs on Mosaic GPU (forward and wgrad)
    mosaic_dgrad: tuning.MosaicMatmulBlocks | None = None

    def geometry(self):
        return dict(strides=self.strides, pads=self.pads, dilation=self.dilation, interpret=self.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, cfg: _Config):
    """The differentiable kernel conv: ``jax.grad`` cannot go through ``pallas_call`` itself."""
    return _conv_forward(x, w, blocks=cfg.fwd_blocks, out_dtype=cfg.out_dtype, mosaic=cfg.mosaic_fwd,
                         **cfg.geometry())


def _conv_fwd(x, w, cfg: _Config):
    """Inputs arrive as CustomVJPPrimal (symbolic_zeros): an input gradient nobody needs is not traced."""
    return _conv(x.value, w.value, cfg), (x.value, w.value, x.perturbed, w.perturbed)


def _conv_bwd(cfg: _Config, res, g):
    """dy is cast to the compute dtype (that of x and w) before both backward kernels."""
    x, w, need_x, need_w = res
    g = g.astype(x.dtype)
    dx = (_conv_dgrad(g, w, x.shape, blocks=cfg.dgrad_blocks, mosaic=cfg.mosaic_dgrad, **cfg.geometry())
          if need_x else None)
    dw = (_conv_wgrad(x, g, w.shape, blocks=cfg.fwd_blocks, mosaic=cfg.mosaic_fwd, **cfg.geometry())
          if need_w else None)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd, symbolic_zeros=True)


# --- the GEMM routes --------------------------------------------------------------------------------------

def _pointwise(x, w, *, strides, pads, out_dtype, interpret):
    """A 1x1 conv is a matmul over pixels: pad/crop and stride x in XLA, then (..., Cin) @ (Cin, Cout)."""
    if any(p != 0 for pair in pads for p in pair):
        x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    x = x[:, ::strides[0], ::strides[1]]
    return matmul(x, w.reshape(w.shape[2], w.shape[3]), out_dtype=out_dtype, interpret=interpret)


def _patchify(x, w, *, out_dtype, interpret):
    """Stride = kernel, no padding: non-overlapping patches, so a reshape and one matmul (K = KH*KW*Cin)."""
    n, h, wd, c = x.shape
    kh, kw, _, cout = w.shape
    oh, ow = h // kh, wd // kw
    p = x[:, :oh * kh, :ow * kw].reshape(n, oh, kh, ow, kw, c).transpose(0, 1, 3, 2, 4, 5)
    return matmul(p.reshape(n, oh, ow, kh * kw * c), w.reshape(kh * kw * c, cout), out_dtype=out_dtype,
                  interpret=interpret)


def _unfolded(x, w, *, strides, pads, dilation, out_hw, out_dtype, interpret):
    """Few input channels (the RGB stem): unfold (kh, kw, cin) into K in XLA and run one matmul."""
    kh, kw, c, cout = w.shape
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    (sh, sw), (dh, dw), (oh, ow) = strides, dilation, out_hw
    cols = [xp[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw]
            for i in range(kh) for j in range(kw)]
    return matmul(jnp.concatenate(cols, axis=-1), w.reshape(kh * kw * c, cout), out_dtype=out_dtype,
                  interpret=interpret)


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


def chosen_lowering(cin: int, cout: int) -> str:
    """"mosaic" or "triton" for an implicit-GEMM conv here (``lowering.chosen``, with the measured Triton wins
    of ``tuning.TRITON_FASTER_THAN_MOSAIC``); the routes to the matmul take the matmul's own choice."""
    slow = tuning.triton_is_faster("conv2d", tuning.conv_shape_class(cin, cout))
    return lowering.chosen("conv2d", tuning.device_kind(), slow)


def route(x_shape, w_shape, strides, pads, dilation) -> str:
    """Which kernel runs a conv: "pointwise", "patchify" or "unfold" (a matmul), else "implicit_gemm"."""
    kh, kw, cin = w_shape[:3]
    if (kh, kw) == (1, 1):
        return "pointwise"
    if tuple(strides) == (kh, kw) and tuple(dilation) == (1, 1) and all(p == 0 for pair in pads for p in pair):
        return "patchify"
    if cin < GATHER_MIN_CIN:
        return "unfold"
    return "implicit_gemm"


def route_of(x_shape, w_shape, strides, padding, dilation=(1, 1)) -> str:
    """``route`` for a conv given as ``conv2d`` takes it (``padding`` "SAME", "VALID" or pairs)."""
    strides, dilation = _pair(strides), _pair(dilation)
    pads = _explicit_pads(x_shape[1:3], w_shape[:2], strides, dilation, padding)
    return route(x_shape, w_shape, strides, pads, dilation)


def conv2d(x, w, *, strides=(1, 1), padding="SAME", dilation=(1, 1), feature_group_count=1,
           precision=None, preferred_element_type=None, blocks=None, interpret=None):
    """NHWC x (N,H,W,Cin) * HWIO w (KH,KW,Cin,Cout) -> NHWC (N,OH,OW,Cout), dtype of x (or preferred_element_type).

    Same semantics as ``lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"))``: ``padding`` is "SAME", "VALID" or ((lo, hi), (lo, hi));
    ``strides``/``dilation`` are positive ints (or pairs). Differentiable (custom_vjp; the backward is Pallas
    too). ``route`` says which kernel runs it (1x1, patchify and few-channel convs run on the Pallas
    matmul). ``feature_group_count != 1`` (grouped/depthwise) is not implemented as a kernel and falls back
    to ``lax.conv_general_dilated``. ``precision`` is ignored (the kernels accumulate in f32). ``blocks`` (a
    ``tuning.ConvBlocks``) overrides the tuning table for the Triton implicit-GEMM kernels (the Mosaic GPU body
    takes ``tuning.use_blocks(conv2d_mgpu=...)``); ``interpret=None`` runs the Pallas interpreter on CPU and
    the GPU kernels elsewhere.
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
    kind = route(x.shape, w.shape, strides, pads, dilation)
    if kind == "pointwise":
        return _pointwise(x, w, strides=strides, pads=pads, out_dtype=out_dtype, interpret=interpret)
    if kind == "patchify":
        return _patchify(x, w, out_dtype=out_dtype, interpret=interpret)
    if kind == "unfold":
        return _unfolded(x, w, strides=strides, pads=pads, dilation=dilation, out_hw=out_hw, out_dtype=out_dtype,
                         interpret=interpret)
    n, (h, wd), (cin, cout) = x.shape[0], x.shape[1:3], w.shape[2:]
    pixels = n * out_hw[0] * out_hw[1]
    mosaic = chosen_lowering(cin, cout) == "mosaic"
    cfg = _Config(strides=strides, pads=pads, dilation=dilation, interpret=interpret, out_dtype=out_dtype,
                  fwd_blocks=tuning.conv_blocks(pixels, cin, cout, blocks, dtype=dtype),
                  dgrad_blocks=tuning.conv_blocks(n * h * wd // (strides[0] * strides[1]), cout, cin, blocks,
                                                  dtype=dtype),
                  mosaic_fwd=tuning.mosaic_conv_blocks(cin, cout, dtype=dtype) if mosaic else None,
                  mosaic_dgrad=tuning.mosaic_conv_blocks(cout, cin, dtype=dtype) if mosaic else None)
    return _conv(x, w, cfg)
