"""How the pure step functions run on devices: the sharding decision lives here, not in the loop.

A strategy turns ``steps.train_step`` / ``steps.eval_step`` into compiled callables and places the state
and batches. The loop calls only ``place_state``, ``place_batch``, ``compile_train`` and ``compile_eval``.
This version ships ``none`` (one device, plain jit with buffer donation); ``dp``, ``fsdp`` and ``pmap``
plug in here with the same four methods.
"""

from __future__ import annotations

from typing import Callable

import jax


class SingleDevice:
    """Strategy ``none``: everything on the first device of the mesh, jit, state buffers donated."""

    name = "none"

    def __init__(self, mesh):
        self.mesh = mesh
        self.device = mesh.devices.flat[0]

    def place_state(self, state):
        return jax.device_put(state, self.device)

    def place_batch(self, batch):
        return jax.device_put(batch, self.device)

    def compile_train(self, train_step: Callable) -> Callable:
        return jax.jit(train_step, donate_argnums=(0,))

    def compile_eval(self, eval_step: Callable) -> Callable:
        return jax.jit(eval_step)


_STRATEGIES = {"none": SingleDevice}


def get_strategy(name: str, mesh):
    """The strategy ``name`` (config ``parallel.strategy``) over ``mesh``."""
    if name not in _STRATEGIES:
        raise ValueError(f"parallel.strategy={name!r} is not available; choose one of: "
                         f"{', '.join(_STRATEGIES)}")
    return _STRATEGIES[name](mesh)
