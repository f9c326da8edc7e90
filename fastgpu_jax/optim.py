"""Optimizers and learning-rate schedules, built from optax with plain values (no config objects).

Per-parameter settings are keyed by a parameter's path, "block3/mlp/fc1/kernel" (the same string the fsdp
rules match). ``param_rules`` give a group its own lr multiplier and/or weight decay; ``layer_decay`` scales
a ViT's lr per encoder block. Both are plain optax transforms whose masks and labels are computed from the
params when the optimizer is initialised, so no params are needed to build it and the optimizer state is a
plain optax state (checkpointed by Orbax like any other).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable, Sequence

import jax
import optax

from fastgpu_jax.config import ConfigError
from fastgpu_jax.parallel.strategies import path_name

SCHEDULES = ("constant", "cosine", "warmup_cosine", "step", "one_cycle")
OPTIMIZERS = ("sgd", "adam", "adamw", "lamb", "lars", "lion")
# Which optimizers read b1 / b2 / eps (None leaves each at that optimizer's own optax default).
_TAKES = {"b1": ("adam", "adamw", "lamb", "lion"), "b2": ("adam", "adamw", "lamb", "lion"),
          "eps": ("adam", "adamw", "lamb")}
_EMBEDDINGS = ("patch_embed", "cls_token", "pos_embedding")  # below block0 for layer decay
_BLOCK = re.compile(r"block(\d+)")


# --- schedules -------------------------------------------------------------------------------------------

def make_schedule(kind: str, lr: float, steps: int, warmup_steps: int = 0, *, boundaries: Sequence[float] = (),
                  factor: float = 0.1) -> optax.Schedule:
    """constant | cosine (to 0 at ``steps``) | warmup_cosine | step | one_cycle.

    constant, cosine and step start with a linear warmup 0 -> lr over ``warmup_steps`` when that is > 0
    (``cosine`` with a warmup is ``warmup_cosine``: the cosine spans ``steps`` including the warmup, as optax's
    warmup_cosine_decay_schedule does). ``step`` multiplies the lr by ``factor`` at each of ``boundaries``
    (fractions of ``steps``, counted from step 0, warmup included). ``one_cycle`` is
    optax.cosine_onecycle_schedule: a cosine rise lr/25 -> lr over ``warmup_steps`` (30% of ``steps`` when 0),
    then a cosine fall to lr/25e4 at ``steps``.
    """
    if kind in ("cosine", "warmup_cosine") and (warmup_steps or kind == "warmup_cosine"):
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup_steps, decay_steps=steps)
    if kind == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=steps)
    if kind == "one_cycle":
        # optax floors pct_start * steps; the half step makes that floor exactly warmup_steps despite rounding.
        rise = {"pct_start": (warmup_steps + 0.5) / steps} if warmup_steps else {}
        return optax.cosine_onecycle_schedule(steps, lr, **rise)
    if kind == "constant":
        return _after_warmup(optax.constant_schedule(lr), lr, warmup_steps)
    if kind == "step":
        if not boundaries:
            raise ValueError("optimizer.schedule 'step' needs boundaries (fractions of the steps)")
        scales: dict[int, float] = {}
        for at in boundary_steps(boundaries, steps):
            scales[at] = scales.get(at, 1.0) * factor  # two fractions on one step: both drops apply
        return _after_warmup(optax.piecewise_constant_schedule(lr, scales), lr, warmup_steps)
    raise ValueError(f"optimizer.schedule {kind!r} is unknown; use one of: {', '.join(SCHEDULES)}")


def boundary_steps(fractions: Sequence[float], steps: int) -> list[int]:
    """The steps where a step schedule drops: each fraction of ``steps``, rounded to the nearest step."""
    return [round(f * steps) for f in fractions]


def _after_warmup(schedule: optax.Schedule, lr: float, warmup_steps: int) -> optax.Schedule:
    """A linear warmup 0 -> lr, then ``schedule`` read at the absolute step (its boundaries do not move)."""
    if not warmup_steps:
        return schedule
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps),
                                 lambda step: schedule(step + warmup_steps)], [warmup_steps])


# --- config strings ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamRule:
    """One ``regex=lr:MULT,wd:DECAY`` entry of ``optimizer.param_rules``; None keeps the default."""

    regex: str
    lr: float | None = None
    wd: float | None = None


def parse_step_boundaries(text: str) -> tuple[float, ...]:
    """'0.5,0.75' -> (0.5, 0.75); '' -> (). Fractions of train.steps, strictly increasing in (0, 1)."""
    rule = "comma-separated fractions of train.steps strictly increasing in (0, 1), e.g. '0.5,0.75'"
    try:
        fractions = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"optimizer.step_boundaries={text!r} must be {rule}") from None
    ok = all(0 < f < 1 for f in fractions) and all(a < b for a, b in zip(fractions, fractions[1:]))
    if not ok:
        raise ConfigError(f"optimizer.step_boundaries={text!r} must be {rule}")
    return fractions


def parse_param_rules(text: str) -> tuple[ParamRule, ...]:
    """'regex=lr:MULT,wd:DECAY;...' -> ParamRules, in order (the first rule matching a path wins)."""
    return tuple(_parse_rule(part) for part in filter(None, (p.strip() for p in text.split(";"))))


def _parse_rule(part: str) -> ParamRule:
    regex, sep, spec = (t.strip() for t in part.rpartition("="))
    form = "must look like 'regex=lr:MULT,wd:DECAY' (either or both keys, e.g. 'head=lr:10' or 'bias=wd:0')"
    if not sep or not regex:
        raise ConfigError(f"optimizer.param_rules entry {part!r} {form}")
    try:
        re.compile(regex)
    except re.error as err:
        raise ConfigError(f"optimizer.param_rules regex {regex!r} does not compile: {err}") from None
    values = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, colon, raw = (t.strip() for t in item.partition(":"))
        if key not in ("lr", "wd") or not colon or key in values:
            raise ConfigError(f"optimizer.param_rules entry {part!r}: {item!r} is not lr:MULT or wd:DECAY (each "
                              "at most once)")
        values[key] = _non_negative(raw, part, item)
    if not values:
        raise ConfigError(f"optimizer.param_rules entry {part!r} {form}")
    return ParamRule(regex, **values)


def _non_negative(raw: str, part: str, item: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"optimizer.param_rules entry {part!r}: {item!r} needs a finite number >= 0")
    return value


def check_settings(*, schedule: str, steps: int, warmup_steps: int, step_boundaries: str, param_rules: str) -> None:
    """The config's checks on the strings this module reads (one-line ConfigErrors naming the key)."""
    parse_param_rules(param_rules)
    if schedule != "step":
        return
    fractions = parse_step_boundaries(step_boundaries)
    if not fractions:
        raise ConfigError("optimizer.step_boundaries is required with optimizer.schedule='step' (fractions of "
                          "train.steps where the lr drops, e.g. '0.5,0.75')")
    first = boundary_steps(fractions, steps)[0]
    if warmup_steps and first <= warmup_steps:
        raise ConfigError(f"optimizer.step_boundaries={step_boundaries!r} drops the lr at step {first}, within "
                          f"optimizer.warmup_steps={warmup_steps}; drops must come after the warmup")


# --- per-parameter groups ----------------------------------------------------------------------------------

def _is_kernel(path) -> bool:
    last = path[-1] if path else None
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"


def _decay_mask(params):
    """Weight decay on Dense/Conv ``kernel``s only: not biases, norm scales, position embeddings or tokens."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _is_kernel(path), params)


_NO_RULE = ParamRule("")  # a leaf no rule matches: every knob at its default


def _matched_rules(tree, rules: Sequence[ParamRule]):
    """The first rule matching each leaf's path (``_NO_RULE`` if none). A rule that matches no path at all is
    a ConfigError: a mistyped regex would otherwise silently change nothing."""
    names = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    for rule in rules:
        if not any(re.search(rule.regex, name) for name in names):
            raise ConfigError(f"optimizer.param_rules regex {rule.regex!r} matches no parameter (paths look like "
                              f"{names[0]!r})")

    def first(path, _):
        name = path_name(path)
        return next((rule for rule in rules if re.search(rule.regex, name)), _NO_RULE)

    return jax.tree_util.tree_map_with_path(first, tree)


def _leaf_decays(tree, rules: Sequence[ParamRule], weight_decay: float):
    """Each leaf's weight decay: its first matching rule's wd, else ``weight_decay`` on kernels and 0 elsewhere."""

    def decay(path, rule):
        if rule.wd is not None:
            return rule.wd
        return weight_decay if _is_kernel(path) else 0.0

    return jax.tree_util.tree_map_with_path(decay, _matched_rules(tree, rules))


def _layer_exponents(tree, layer_decay: float, model_name: str):
    """BEiT's layer-wise lr decay exponents: block i of L -> L - i, embeddings -> L + 1, the rest (final norm,
    head) -> 0. Only the path's first component counts (our ViT's module names)."""
    tops = [path_name(path).split("/")[0] for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    blocks = [int(m.group(1)) for m in map(_BLOCK.fullmatch, tops) if m]
    if not blocks:
        raise ConfigError(f"optimizer.layer_decay={layer_decay} needs encoder blocks named block0..block<L-1> (a "
                          f"ViT), but model.name={model_name!r} has none; leave it at 1.0")
    depth = max(blocks) + 1

    def exponent(path, _):
        top = path_name(path).split("/")[0]
        block = _BLOCK.fullmatch(top)
        if block:
            return depth - int(block.group(1))
        return depth + 1 if top in _EMBEDDINGS else 0

    return jax.tree_util.tree_map_with_path(exponent, tree)


def lr_multipliers(params, rules: Sequence[ParamRule] = (), layer_decay: float = 1.0, model_name: str = "?"):
    """Each leaf's lr multiplier: its first matching rule's lr (1 if none) times layer_decay ** exponent."""
    rule_lr = jax.tree.map(lambda rule: 1.0 if rule.lr is None else rule.lr, _matched_rules(params, rules))
    if layer_decay == 1.0:
        return rule_lr
    return jax.tree.map(lambda m, e: m * layer_decay ** e, rule_lr, _layer_exponents(params, layer_decay, model_name))


def _scale_lr_per_leaf(rules, layer_decay: float, model_name: str) -> optax.GradientTransformation:
    """Multiplies each leaf's update by its ``lr_multipliers`` factor. Every optimizer here is linear in its
    lr (momentum and moments come before the lr, or are linear after it), so this is that leaf's lr scaled,
    decoupled weight decay included (as PyTorch's per-group lr). Stateless; init checks the multipliers
    once, so a wrong rule or model fails when the state is built, not at the first step."""

    def scale(updates, params=None):
        mults = lr_multipliers(updates, rules, layer_decay, model_name)
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, mults)

    def init(params):
        lr_multipliers(params, rules, layer_decay, model_name)
        return optax.EmptyState()

    return optax.GradientTransformation(init, optax.stateless(scale).update)


# --- optimizers --------------------------------------------------------------------------------------------

def _core(name: str, schedule, weight_decay: float, decay_mask, *, momentum: float, nesterov: bool,
          betas: dict) -> list[optax.GradientTransformation]:
    """The optimizer as a list of chain parts: coupled L2 (sgd, adam) first, then the optax optimizer."""
    if name == "sgd":
        core = optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov)
    elif name == "adam":
        core = optax.adam(schedule, **betas)
    elif name == "adamw":
        core = optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask, **betas)
    elif name == "lamb":
        core = optax.lamb(schedule, weight_decay=weight_decay, mask=decay_mask, **betas)
    elif name == "lars":  # trust ratio on kernels only too, as SimCLR / BYOL: norm scales and biases keep lr
        core = optax.lars(schedule, weight_decay=weight_decay, weight_decay_mask=decay_mask or True,
                          trust_ratio_mask=_decay_mask, momentum=momentum, nesterov=nesterov)
    elif name == "lion":
        core = optax.lion(schedule, weight_decay=weight_decay, mask=decay_mask, **betas)
    else:
        raise ValueError(f"optimizer.name {name!r} is unknown; use one of: {', '.join(OPTIMIZERS)}")
    if weight_decay > 0 and name in ("sgd", "adam"):
        return [optax.add_decayed_weights(weight_decay, mask=decay_mask), core]
    return [core]


def _decay_groups(core: Callable, rules: Sequence[ParamRule], weight_decay: float) -> optax.GradientTransformation:
    """optax.multi_transform with one copy of the optimizer per weight-decay value: the optimizers are
    per-leaf (lamb's and lars's trust ratios included), so this equals one optimizer with per-leaf decay."""
    values = sorted({0.0, weight_decay} | {r.wd for r in rules if r.wd is not None})
    labels = {v: f"decay{i}" for i, v in enumerate(values)}  # plain names: they become checkpoint paths
    transforms = {labels[v]: optax.chain(*core(v, None)) for v in values}

    def label(tree):
        return jax.tree.map(labels.get, _leaf_decays(tree, rules, weight_decay))

    return optax.multi_transform(transforms, label)


def make_optimizer(name: str, schedule: optax.Schedule, *, momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0, grad_clip_norm: float = 0.0, b1: float | None = None,
                   b2: float | None = None, eps: float | None = None, param_rules: Sequence[ParamRule] = (),
                   layer_decay: float = 1.0, model_name: str = "?") -> optax.GradientTransformation:
    """sgd | adam | adamw | lamb | lars | lion, with optional global-norm clipping (applied first).

    ``weight_decay`` is L2 added to the gradient (coupled) for sgd and adam, and for lars before its trust
    ratio (as the LARS paper); adamw, lamb and lion use their decoupled decay. Only kernels are decayed unless
    a ``param_rules`` entry sets a leaf's wd; lars adapts only kernels' lr by the trust ratio.
    ``b1``/``b2``/``eps``: None keeps the optimizer's optax default (lion's betas differ from adam's).
    ``momentum``/``nesterov`` are read by sgd and lars only. ``param_rules`` and ``layer_decay`` multiply
    leaves' lr (``lr_multipliers``); ``model_name`` names the model in their errors.
    """
    given = {"b1": b1, "b2": b2, "eps": eps}
    for key, value in given.items():
        if value is not None and name not in _TAKES[key]:
            raise ValueError(f"optimizer.{key} has no effect on optimizer.name={name!r}")
    core = functools.partial(_core, name, schedule, momentum=momentum, nesterov=nesterov,
                             betas={k: v for k, v in given.items() if v is not None})
    parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
    if any(rule.wd is not None for rule in param_rules):
        parts.append(_decay_groups(core, param_rules, weight_decay))
    else:
        parts.extend(core(weight_decay, _decay_mask))  # flat as before: older checkpoints keep their layout
    if param_rules or layer_decay != 1.0:
        parts.append(_scale_lr_per_leaf(tuple(param_rules), layer_decay, model_name))
    return optax.chain(*parts)
