"""Random bits per example, so a run does not depend on how many devices share the batch.

Why: under ``dp`` (shard_map) and ``pmap`` every device traces the model on its own rows. Flax's
``Dropout`` draws one mask for the array it sees, so which units of example i are dropped would depend on
which device holds it and on how many rows sit beside it: 1, 2, 4 or 8 devices would train different
models from the same config. Here the mask of example i is drawn from ``fold_in(key, i)``, where ``key`` is
the layer's usual ``make_rng`` key (same on every device: the step folds in the step number, never the
device) and ``i`` is the example's row in the *global* batch. Every strategy, device count, process count
and gradient-accumulation split then draws the same mask for the same example.

How: the train step wraps the model in ``with per_example_dropout(example_ids):``; a flax method
interceptor replaces the ``__call__`` of every ``flax.linen.Dropout`` (and subclass) traced inside by
``dropout_rows``, which keeps flax's semantics (``rate``, ``broadcast_dims``, ``deterministic``, an explicit
``rng=``, the ``rng_collection``) and only changes how the mask is drawn. User models built with flax's own
Dropout get the same guarantee without changing a line.

Cost: one ``fold_in`` per example and layer, and ``bernoulli`` vmapped over the rows (the same number of
random bits as one draw). A Dropout whose input does not have one row per example (a reshaped batch, a
broadcast over axis 0) falls back to flax's single draw with the key folded by the first row's index, so
devices still draw independent masks but the run is no longer device-count invariant.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


@contextlib.contextmanager
def per_example_dropout(example_ids: jax.Array) -> Iterator[None]:
    """Inside the block (at trace time), every flax Dropout draws its mask row by row from
    ``fold_in(key, example_ids[row])``. ``example_ids``: (rows,) int32, each row's index in the global batch."""

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            return dropout_rows(context.module, example_ids, *args, **kwargs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def dropout_rows(module: nn.Dropout, example_ids, inputs, deterministic: bool | None = None, rng=None):
    """``flax.linen.Dropout.__call__`` with the mask of row r drawn from ``fold_in(rng, example_ids[r])``."""
    deterministic = nn.merge_param("deterministic", module.deterministic, deterministic)
    if module.rate == 0.0 or deterministic:
        return inputs
    if module.rate == 1.0:  # as flax: avoids NaN gradients
        return jnp.zeros_like(inputs)
    keep = 1.0 - module.rate
    if rng is None:
        rng = module.make_rng(module.rng_collection)
    shape = list(inputs.shape)
    for dim in module.broadcast_dims:
        shape[dim] = 1
    if inputs.ndim and shape[0] == example_ids.shape[0]:
        keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, example_ids)
        mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, shape[1:]))(keys)
    else:  # no row per example: one draw, still independent across devices
        mask = jax.random.bernoulli(jax.random.fold_in(rng, example_ids[0]), keep, shape)
    mask = jnp.broadcast_to(mask, inputs.shape)
    return lax.select(mask, inputs / keep, jnp.zeros_like(inputs))
