"""Pure train and eval steps. No I/O, no globals, no config: the strategy decides how they are jitted.

    train_step(state, batch, rng=None) -> (state, metrics)
    eval_step(state, batch) -> metrics

``batch`` is ``{"image": (B, H, W, C) float32 normalised, or uint8 (see ``model_input``), "label": (B,) int32}``
(+ ``"mask"`` (B,) for eval, 0 on padding rows). When ``state.options.axis_name`` is set (dp, pmap), the steps
run per device inside a mapped axis and reduce gradients, metrics and eval sums over it. Train metrics are
per-step means; eval metrics are sums (``loss_sum``, ``correct``, ``top5_correct`` with more than 5 classes,
``count``) so that batches of any size aggregate exactly.

The training loss is softmax cross-entropy against soft targets when label smoothing (``optax.smooth_labels``)
or mixup/cutmix (``fastgpu_jax.mix``) is on, else against the integer labels. Train ``accuracy`` always compares
with the example's own (unmixed) label. With ``options.ema_decay`` > 0 the step also updates an exponential
moving average of the params and BatchNorm statistics (``state.ema``); ``ema_view`` evaluates it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fastgpu_jax import mix
from fastgpu_jax.nn.per_example import per_example_dropout
from fastgpu_jax.state import TrainState


def cross_entropy(logits, labels):
    """Per-example softmax cross-entropy, computed in float32 whatever the compute dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def soft_cross_entropy(logits, targets):
    """Per-example softmax cross-entropy against soft ``targets`` (rows, classes), in float32."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_loss(logits, labels, options, lam=None):
    """Mean training loss: label smoothing and mixup/cutmix (``lam``: each row's own-target weight) make the
    targets soft; without either it is the plain integer-label cross-entropy."""
    if not options.label_smoothing and lam is None:
        return jnp.mean(cross_entropy(logits, labels))
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if options.label_smoothing:
        targets = optax.smooth_labels(targets, options.label_smoothing)
    if lam is not None:
        targets = mix.mix_targets(targets, lam)
    return jnp.mean(soft_cross_entropy(logits, targets))


def compute_metrics(logits, labels, mask=None) -> dict:
    """Summed loss, correct predictions (and top-5 correct when there are more than 5 classes) and example count
    (mask weights rows; None means all ones)."""
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    loss = cross_entropy(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    out = {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}
    if logits.shape[-1] > 5:
        top5 = jnp.any(lax.top_k(logits, 5)[1] == labels[:, None], axis=-1).astype(jnp.float32)
        out["top5_correct"] = jnp.sum(top5 * mask)
    return out


def model_input(state: TrainState, images) -> jax.Array:
    """The model's input: uint8 images (the image data sets send 4x fewer bytes) are normalised here, on the
    device, with the data set's mean/std; float images arrive normalised by the host pipeline."""
    if images.dtype != jnp.uint8:
        return images
    o = state.options
    if o.input_mean is None or o.input_std is None:
        raise ValueError("uint8 images need the data set's mean/std in the state's StepOptions "
                         "(input_mean, input_std); build the state with builders.build_state")
    return normalize_uint8(images, o.input_mean, o.input_std)


def normalize_uint8(images, mean, std) -> jax.Array:
    """``(images - mean) / std`` per channel in float32: the device half of the image data sets' pipeline."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def example_ids(batch: dict, axis_name: str | None) -> jax.Array:
    """Each local row's index in the global batch: the shard's offset (dp/pmap: the device's position on
    the mapped axis times the rows per device) plus the row. Random draws are keyed by it."""
    rows = batch["label"].shape[0]
    offset = 0 if axis_name is None else lax.axis_index(axis_name) * rows
    return offset + jnp.arange(rows, dtype=jnp.int32)


def _loss_and_grads(state: TrainState, params, batch_stats, batch, rng, ids):
    """Gradient of the (loss-scaled) mean loss on one micro-batch, and the new BatchNorm stats. Dropout
    masks and mixup/cutmix draws are per example from (rng, global row ``ids``): the same for any device count."""
    has_bn = bool(batch_stats)
    images, lam = batch["image"], None
    if state.options.mix.enabled:
        images, lam = mix.mix_images(images, ids, rng, state.options.mix)

    def loss_fn(p):
        variables = {"params": p, "batch_stats": batch_stats} if has_bn else {"params": p}
        with per_example_dropout(ids):
            out = state.apply_fn(variables, images, train=True, rngs={"dropout": rng},
                                 mutable=["batch_stats"] if has_bn else False)
        logits, updates = out if has_bn else (out, {})
        loss = train_loss(logits, batch["label"], state.options, lam)
        return loss * state.loss_scale, (loss, logits, updates.get("batch_stats", batch_stats))

    grads, (loss, logits, new_stats) = jax.grad(loss_fn, has_aux=True)(params)
    correct = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    return grads, loss, correct, new_stats


def _accumulated_grads(state: TrainState, batch, rng, ids):
    """Mean gradient over ``grad_accum_steps`` micro-batches, scanned so memory stays flat. Every
    micro-batch uses the step's ``rng``: its examples' global ``ids`` already tell their draws apart."""
    k = state.options.grad_accum_steps
    if k == 1:
        return _loss_and_grads(state, state.params, state.batch_stats, batch, rng, ids)
    micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), (batch, ids))

    def body(carry, inputs):
        grad_sum, stats, loss_sum, correct_sum = carry
        mb, mb_ids = inputs
        g, loss, correct, stats = _loss_and_grads(state, state.params, stats, mb, rng, mb_ids)
        grad_sum = jax.tree.map(jnp.add, grad_sum, g)
        return (grad_sum, stats, loss_sum + loss, correct_sum + correct), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, state.batch_stats, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grad_sum, stats, loss_sum, correct_sum), _ = lax.scan(body, init, micro)
    return jax.tree.map(lambda g: g / k, grad_sum), loss_sum / k, correct_sum / k, stats


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def ema_decay(options, step):
    """The EMA's decay at update ``step`` (0-based): ``ema_decay``, or with ``ema_warmup``
    ``min(ema_decay, (1 + step) / (10 + step))`` (TensorFlow's ExponentialMovingAverage with num_updates), so the
    average is not dominated by the random init in the first steps."""
    decay = jnp.asarray(options.ema_decay, jnp.float32)
    if options.ema_warmup:
        step = step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


def _updated_ema(state: TrainState, params, batch_stats):
    """``ema <- decay * ema + (1 - decay) * new`` for the params and BatchNorm stats; {} when EMA is off."""
    if not state.ema:
        return state.ema
    decay = ema_decay(state.options, state.step)
    new = {"params": params, "batch_stats": batch_stats}
    return jax.tree.map(lambda e, x: (decay * e + (1 - decay) * x).astype(e.dtype), state.ema, new)


def ema_view(state: TrainState) -> TrainState:
    """The state with its EMA params and BatchNorm stats in place of the raw ones (to evaluate, export)."""
    if not state.ema:
        raise ValueError("this state has no EMA weights (train.ema_decay was 0)")
    return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


def _next_loss_scale(state: TrainState, grads_finite):
    """Dynamic loss scaling (float16): halve on overflow, double after ``loss_scale_period`` good steps."""
    if not state.options.dynamic_loss_scale:
        return state.loss_scale, state.good_steps
    good = jnp.where(grads_finite, state.good_steps + 1, 0)
    grow = good >= state.options.loss_scale_period
    scale = jnp.where(grads_finite, jnp.where(grow, state.loss_scale * 2, state.loss_scale),
                      jnp.maximum(state.loss_scale / 2, 1.0))
    return scale, jnp.where(grow, 0, good)


def train_step(state: TrainState, batch: dict, rng: jax.Array | None = None):
    """One optimizer update on ``batch``.

    The update is skipped (the state advances ``step`` only) when the loss, any gradient, the gradient's
    global norm or any updated parameter is non-finite: an overflowing norm with finite elements, or a huge
    learning rate that pushes finite parameters to inf, are caught as well as NaN gradients. Skipped steps are
    reported in ``metrics["nonfinite"]``; under float16 a gradient overflow only shrinks the loss scale and
    is not reported unless the loss or the parameters are non-finite. All checks are device-side reductions:
    no host sync.
    """
    axis = state.options.axis_name
    rng = jax.random.fold_in(state.rng, state.step) if rng is None else rng  # the same on every device
    batch = {**batch, "image": model_input(state, batch["image"])}
    grads, loss, accuracy, new_stats = _accumulated_grads(state, batch, rng, example_ids(batch, axis))
    if axis is not None:  # the mean over the global batch = the mean of equal-sized shard means
        grads, loss, accuracy = lax.pmean((grads, loss, accuracy), axis)
    grads = jax.tree.map(lambda g: g / state.loss_scale, grads)
    grad_norm = optax.tree.norm(grads)
    grads_finite = _all_finite(grads) & jnp.isfinite(grad_norm)
    loss_finite = jnp.isfinite(loss)
    updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    params_finite = _all_finite(new_params)
    ok = grads_finite & loss_finite & params_finite
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    scale, good = _next_loss_scale(state, grads_finite)
    params, stats = keep(new_params, state.params), keep(new_stats, state.batch_stats)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=keep(new_opt_state, state.opt_state),
        batch_stats=stats,
        ema=keep(_updated_ema(state, params, stats), state.ema),
        loss_scale=scale,
        good_steps=good,
    )
    if state.options.dynamic_loss_scale:  # an overflow under float16 is the loss scale's business
        reported_bad = ~loss_finite | (grads_finite & ~params_finite)
    else:
        reported_bad = ~ok
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "lr": jnp.asarray(state.lr_fn(state.step), jnp.float32),
        "grad_norm": grad_norm,
        "loss_scale": state.loss_scale,
        "nonfinite": reported_bad.astype(jnp.int32),
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: dict) -> dict:
    """Summed loss / correct / count over the real (mask=1) rows of ``batch``."""
    logits = state.apply_fn(state.variables, model_input(state, batch["image"]), train=False)
    sums = compute_metrics(logits, batch["label"], batch.get("mask"))
    axis = state.options.axis_name
    return sums if axis is None else lax.psum(sums, axis)


def predict_step(state: TrainState, images) -> jax.Array:
    """Logits (float32) for ``images``, inference mode."""
    return state.apply_fn(state.variables, model_input(state, images), train=False).astype(jnp.float32)
