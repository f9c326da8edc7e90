"""Optimizers and learning-rate schedules, built from optax with plain values (no config objects)."""

from __future__ import annotations

import jax
import optax


def make_schedule(kind: str, lr: float, steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """constant | cosine (to 0 at ``steps``) | warmup_cosine, each after a linear warmup 0 -> lr over
    ``warmup_steps`` when that is > 0 (``cosine`` with a warmup is ``warmup_cosine``: the cosine spans
    ``steps`` including the warmup, as optax's warmup_cosine_decay_schedule does)."""
    if kind in ("cosine", "warmup_cosine") and (warmup_steps or kind == "warmup_cosine"):
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup_steps, decay_steps=steps)
    if kind == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=steps)
    if kind == "constant":
        if not warmup_steps:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
                                    [warmup_steps])
    raise ValueError(f"optimizer.schedule {kind!r} is unknown; use constant, cosine or warmup_cosine")


def _decay_mask(params):
    """Weight decay on Dense/Conv ``kernel``s only: not biases, norm scales, position embeddings or tokens."""

    def is_kernel(path, _):
        last = path[-1] if path else None
        return getattr(last, "key", getattr(last, "name", None)) == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(name: str, schedule: optax.Schedule, *, momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0, grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
    """sgd | adam | adamw | lamb, with optional global-norm clipping (applied first) and weight decay.

    For sgd and adam, ``weight_decay`` is L2 added to the gradient (coupled); adamw and lamb use their
    decoupled decay. Either way only kernels are decayed.
    """
    if name == "sgd":
        core = optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov)
    elif name == "adam":
        core = optax.adam(schedule)
    elif name == "adamw":
        core = optax.adamw(schedule, weight_decay=weight_decay, mask=_decay_mask)
    elif name == "lamb":
        core = optax.lamb(schedule, weight_decay=weight_decay, mask=_decay_mask)
    else:
        raise ValueError(f"optimizer.name {name!r} is unknown; use sgd, adam, adamw or lamb")
    parts = []
    if grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    if weight_decay > 0 and name in ("sgd", "adam"):
        parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
    parts.append(core)
    return optax.chain(*parts)
