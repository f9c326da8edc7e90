"""Pallas kernels under jit + NamedSharding (strategy ``fsdp``): run each kernel on its batch shard.

Why: a Pallas kernel is a custom call that XLA's SPMD partitioner cannot split (on CPU, an interpreted loop
it does not split either), so under plain ``jit`` with a batch-sharded input XLA all-gathers the
activations and every device computes the whole batch. Inside ``with kernels_per_shard(mesh, axes):``
(the fsdp strategy sets it while its step is traced) ``run`` wraps the kernel in ``jax.shard_map``: the
activation stays split over ``axes`` on its leading (batch) dimension, the weight enters whole (fsdp
gathers params before use anyway), and the backward pass sums the weight gradient over the shards with one
``psum``. Under ``dp`` and ``pmap`` the step already runs per device, so nothing is wrapped there.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

_active: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("fastgpu_kernel_mesh", default=None)


@contextlib.contextmanager
def kernels_per_shard(mesh, axes: tuple[str, ...]) -> Iterator[None]:
    """Kernels traced inside the block run per shard of ``mesh`` over the batch ``axes``."""
    token = _active.set((mesh, tuple(axes)))
    try:
        yield
    finally:
        _active.reset(token)


def shards_for(x) -> int:
    """How many batch shards ``run`` would split ``x`` into now (1: it runs the kernel as is)."""
    ctx = _active.get()
    if ctx is None or not getattr(x, "ndim", 0):
        return 1
    mesh, axes = ctx
    n = math.prod(mesh.shape[a] for a in axes)
    return n if n > 1 and x.shape[0] % n == 0 else 1


def run(kernel: Callable, x, w, **kwargs):
    """``kernel(x, w, **kwargs)``, per batch shard of ``x`` when a ``kernels_per_shard`` block is active and
    the shard count divides ``x.shape[0]``; as is otherwise."""
    if shards_for(x) == 1:
        return kernel(x, w, **kwargs)
    mesh, axes = _active.get()
    fn = lambda x, w: kernel(x, w, **kwargs)  # noqa: E731
    batch = P(axes)

    def mapped(body, in_specs, out_specs):
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    @jax.custom_vjp
    def op(x, w):
        return mapped(fn, (batch, P()), batch)(x, w)

    def fwd(x, w):
        return op(x, w), (x, w)

    def bwd(residuals, g):
        def local(x, w, g):
            _, vjp = jax.vjp(fn, x, w)  # its forward is dead code: XLA drops it
            dx, dw = vjp(g)
            return dx, lax.psum(dw, axes)

        return mapped(local, (batch, P(), batch), (batch, P()))(*residuals, g)

    op.defvjp(fwd, bwd)
    return op(x, w)
