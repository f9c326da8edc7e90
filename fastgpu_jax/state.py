"""TrainState: everything a training step reads and writes, as one pytree.

Array fields (saved in checkpoints): ``step``, ``params``, ``batch_stats`` (empty dict for models without
BatchNorm), ``opt_state``, ``rng`` (the run's base key; the key of step s is ``fold_in(rng, s)``, so dropout
does not depend on how many steps ran in this process), ``loss_scale`` and ``good_steps`` (dynamic loss
scaling, float16 only; 1.0 and 0 otherwise), ``ema`` (``{"params", "batch_stats"}``: the weight EMA when
``options.ema_decay`` > 0, starting at the init; ``{}`` otherwise). Static fields (not saved): ``apply_fn``,
``tx``, ``lr_fn`` and ``options``, which are rebuilt from the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fastgpu_jax.mix import MixOptions

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How a train step runs; static (changing one re-traces the step)."""

    grad_accum_steps: int = 1
    precision: str = "float32"  # compute dtype; params stay float32
    nan_policy: str = "stop"  # both skip a non-finite update; "stop" makes the loop raise
    loss_scale_period: int = 2000  # float16: good steps before the loss scale doubles
    axis_name: str | None = None  # set by dp/pmap: gradients, metrics and eval sums are reduced over it
    # Per-channel mean/std (pixel units) that turn uint8 batches into the model's float input on the device.
    input_mean: tuple | None = None
    input_std: tuple | None = None
    label_smoothing: float = 0.0
    mix: MixOptions = MixOptions()  # mixup/cutmix on the device (off by default)
    ema_decay: float = 0.0  # > 0: the step keeps an EMA of params and BatchNorm stats in ``TrainState.ema``
    ema_warmup: bool = True

    @property
    def dynamic_loss_scale(self) -> bool:
        return self.precision == "float16"


ARRAY_FIELDS = ("step", "params", "batch_stats", "opt_state", "rng", "loss_scale", "good_steps", "ema")


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    loss_scale: jax.Array
    good_steps: jax.Array
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    lr_fn: Callable = flax.struct.field(pytree_node=False)
    ema: Any = flax.struct.field(default_factory=dict)  # an array field; a default so it may be left out
    options: StepOptions = flax.struct.field(pytree_node=False, default=StepOptions())

    @property
    def variables(self) -> dict:
        """The flax variables dict for ``apply_fn``."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def create_train_state(model, tx: optax.GradientTransformation, *, seed: int, input_shape: tuple,
                       lr_fn: Callable | None = None, options: StepOptions = StepOptions(),
                       loss_scale_init: float = 2.0 ** 15, shardings: Any = None,
                       abstract: bool = False) -> TrainState:
    """Initialises params (float32) from ``seed`` on an all-zeros batch of ``input_shape`` (N, H, W, C).

    ``abstract=True`` returns the state's shapes and dtypes only (``jax.ShapeDtypeStruct`` leaves, from
    ``jax.eval_shape``: nothing is compiled or allocated): the target of a checkpoint restore, and what a
    strategy reads to choose shardings. ``shardings`` (a TrainState-shaped tree of ``jax.sharding.Sharding``,
    e.g. ``strategy.state_shardings(abstract_state)``) makes one jitted init write every leaf straight into
    its shards: under FSDP no device and no host ever holds a whole parameter.
    """
    def arrays() -> dict:  # the array fields only: jit's out_shardings must not compare the static ones
        base = jax.random.PRNGKey(seed)  # inside: an abstract state then compiles nothing, not even the key
        init_key, _ = jax.random.split(base)
        variables = model.init({"params": init_key, "dropout": init_key}, jnp.zeros(input_shape, jnp.float32),
                               train=False)
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        ema = {"params": copy(params), "batch_stats": copy(batch_stats)} if options.ema_decay > 0 else {}
        return dict(step=jnp.asarray(0, jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=base,
                    loss_scale=jnp.asarray(loss_scale_init if options.dynamic_loss_scale else 1.0, jnp.float32),
                    good_steps=jnp.asarray(0, jnp.int32), ema=ema)

    if abstract:
        values = jax.eval_shape(arrays)
    else:
        out_shardings = None if shardings is None else {name: getattr(shardings, name) for name in ARRAY_FIELDS}
        values = jax.jit(arrays, out_shardings=out_shardings)()
    return TrainState(**values, apply_fn=model.apply, tx=tx, lr_fn=lr_fn or (lambda step: jnp.nan),
                      options=options)


def copy(tree):
    """Each leaf in a buffer of its own: the EMA starts equal to the params but must not alias them, since the
    train step donates both."""
    return jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, tree)


def with_shardings(abstract_state: TrainState, shardings) -> TrainState:
    """The abstract state with a sharding on every leaf: a restore target that Orbax reads straight into
    those shards (a checkpoint written under another device count or strategy is resharded on read)."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        abstract_state, shardings)
