"""Mixup and CutMix on the device, drawn per example so a run is the same on any device count.

Mixup (Zhang et al. 2018) blends two images and their targets with weight ``lam ~ Beta(a, a)``; CutMix (Yun et
al. 2019) pastes a box of the partner image whose area is ``1 - lam`` and mixes the targets by the area actually
pasted (the box is clipped at the border, as timm's ``rand_bbox``). With both on, each example uses CutMix with
probability ``switch_prob``; each example is mixed at all with probability ``prob``. These are timm's
``Mixup(mode="elem")`` semantics.

Why per example and why neighbours: under ``dp``/``pmap`` each device sees only its rows. timm pairs row i with
row B-1-i of the whole batch, which would pair different examples on 1 and 8 devices. Here row 2k is mixed with
row 2k+1 and vice versa (pairs never straddle a device when every device holds an even number of rows), and
example i draws its ``lam``, its mixup-or-cutmix choice and its box from ``fold_in(key, i)`` where i is its row in
the global batch. 1, 2, 4 or 8 devices, any process count and any gradient-accumulation split then produce the
same mixed batch. The host pipeline shuffles, so neighbours are random partners.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_STREAM = 0x6D6978  # folded into the step's key so mixing draws never coincide with dropout draws


@dataclasses.dataclass(frozen=True)
class MixOptions:
    """``data.mixup_alpha``, ``data.cutmix_alpha``, ``data.mixup_switch_prob``, ``data.mixup_prob``."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5
    prob: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def partner(x: jax.Array) -> jax.Array:
    """Rows swapped in neighbouring pairs: (0, 1, 2, 3, ...) -> (1, 0, 3, 2, ...)."""
    rows = x.shape[0]
    return x.reshape((rows // 2, 2) + x.shape[1:])[:, ::-1].reshape(x.shape)


def _box(key, lam, height: int, width: int):
    """timm's ``rand_bbox``: a box of side ratio sqrt(1 - lam) centred uniformly, clipped at the border."""
    cut = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
    ky, kx = jax.random.split(key)
    cy, cx = jax.random.randint(ky, (), 0, height), jax.random.randint(kx, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    return y0, y1, x0, x1


def draw(key, opts: MixOptions, height: int, width: int) -> dict:
    """One example's draw: its target weight ``lam`` (1 = unmixed), whether it uses CutMix, and the box."""
    k_apply, k_switch, k_lam, k_box = jax.random.split(key, 4)
    apply = jax.random.bernoulli(k_apply, opts.prob)
    if opts.mixup_alpha > 0 and opts.cutmix_alpha > 0:
        use_cut = jax.random.bernoulli(k_switch, opts.switch_prob)
    else:
        use_cut = jnp.asarray(opts.cutmix_alpha > 0)
    alpha = jnp.where(use_cut, opts.cutmix_alpha, opts.mixup_alpha)
    lam = jax.random.beta(k_lam, alpha, alpha).astype(jnp.float32)
    y0, y1, x0, x1 = _box(k_box, lam, height, width)
    cut_lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
    lam = jnp.where(apply, jnp.where(use_cut, cut_lam, lam), 1.0)
    empty = ~(apply & use_cut)  # an unmixed or mixup example pastes nothing
    return {"lam": lam, "cut": use_cut & apply, "box": jnp.where(empty, 0, jnp.stack([y0, y1, x0, x1]))}


def mix_images(images: jax.Array, ids: jax.Array, key, opts: MixOptions) -> tuple[jax.Array, jax.Array]:
    """(mixed images, lam (rows,) float32) for a (rows, H, W, C) batch whose rows have global indices ``ids``.
    The targets mix as ``lam * t + (1 - lam) * partner(t)`` (``mix_targets``)."""
    rows, height, width = images.shape[:3]
    if rows % 2:
        raise ValueError(f"mixup/cutmix mix neighbouring rows, so every device's (micro-)batch needs an even number "
                         f"of rows; this one has {rows}: make data.batch_size a multiple of 2 x devices x "
                         "train.grad_accum_steps")
    key = jax.random.fold_in(key, _STREAM)
    d = jax.vmap(lambda i: draw(jax.random.fold_in(key, i), opts, height, width))(ids)
    other = partner(images)
    ys, xs = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
    y0, y1, x0, x1 = (d["box"][:, j, None, None] for j in range(4))
    in_box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)  # (rows, H, W)
    lam = d["lam"].astype(images.dtype)[:, None, None, None]
    blended = lam * images + (1 - lam) * other
    cut = jnp.where(in_box[..., None], other, images)
    return jnp.where(d["cut"][:, None, None, None], cut, blended), d["lam"]


def mix_targets(targets: jax.Array, lam: jax.Array) -> jax.Array:
    """Soft targets (rows, classes) mixed with the partners' by ``lam`` (rows,)."""
    return lam[:, None] * targets + (1 - lam[:, None]) * partner(targets)
