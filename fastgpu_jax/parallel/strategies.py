"""How the pure step functions run on devices: the sharding decision lives here, not in the loop.

The loop calls only these methods, whatever ``parallel.strategy`` says:

    state_shardings(abstract)     a Sharding per leaf of a (possibly abstract) TrainState: the layout the state
                                  is created in (jit out_shardings) and restored into
    place_state(state)            TrainState -> device layout of this strategy (no copy if already there)
    host_state(state)             device layout -> one logical TrainState (for checkpoints and evaluation)
    place_batch(batch, is_global) numpy batch -> device arrays (``is_global``: every process holds the whole
                                  batch, e.g. eval; otherwise each process holds only its own rows)
    compile_train(train_step)     -> callable (state, batch) -> (state, metrics), metrics replicated scalars
    compile_eval(eval_step)       -> callable (state, batch) -> metrics (global sums)
    axis_name                     the mapped axis the step reduces over ("data" for dp/pmap, else None)

Strategies:
- ``none``: one device, plain jit, state buffers donated.
- ``dp``: ``jax.shard_map`` over all devices; params replicated; each device runs the step on its shard and
  ``train_step`` averages gradients (``lax.pmean``) and BatchNorm statistics over ``data``. ``check_vma`` is
  off: with it on, gradients of replicated params arrive already summed and a pmean would scale them wrong
  (JAX_NOTES), and Pallas kernels inside shard_map need it off anyway.
- ``fsdp``: ``jax.jit`` with ``NamedSharding``s: params and optimizer state sharded over ``fsdp`` by
  regex rules (``partition_specs``), the batch over (data, fsdp); XLA inserts the collectives.
- ``pmap``: the legacy path: state replicated along a leading device axis, ``jax.pmap`` over ``data``.

Every strategy computes the same math up to float reduction order, dropout included (tested to 1e-5
relative on 1/2/4/8 devices and 2 processes): a dropout mask is drawn per example from the step's key and
the example's row in the global batch (``fastgpu_jax.nn.per_example``), never from the device index.
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fastgpu_jax.nn.per_shard import kernels_per_shard

BATCH_AXES = ("data", "fsdp")


def _to_numpy(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _global_array(x: np.ndarray, sharding) -> jax.Array:
    """A global array from a value every process holds in full (works in multi-process runs too)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _place(state, shardings):
    """``state`` in ``shardings``: a no-op for arrays already laid out so (created or restored sharded), a
    device-to-device reshard for other global arrays, a per-process copy for host values."""

    def put(x, sharding):
        if isinstance(x, jax.Array):
            return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
        return _global_array(x, sharding)

    return jax.tree.map(put, state, shardings)


class SingleDevice:
    """Strategy ``none``: everything on the first device of the mesh, jit, state buffers donated."""

    name = "none"
    axis_name = None

    def __init__(self, mesh):
        self.mesh = mesh
        self.device = mesh.devices.flat[0]

    def state_shardings(self, state):
        one = jax.sharding.SingleDeviceSharding(self.device)
        return jax.tree.map(lambda _: one, state)

    def place_state(self, state):
        return jax.device_put(state, self.device)

    def host_state(self, state):
        return state

    def place_batch(self, batch, is_global: bool = False):
        return jax.device_put(batch, self.device)

    def compile_train(self, train_step: Callable) -> Callable:
        return jax.jit(train_step, donate_argnums=(0,))

    def compile_eval(self, eval_step: Callable) -> Callable:
        return jax.jit(eval_step)


class _Sharded:
    """Shared by dp and fsdp: batches sharded over (data, fsdp) on their leading axis, global arrays."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
        self.replicated = NamedSharding(mesh, P())

    def place_batch(self, batch, is_global: bool = False):
        if is_global:
            return jax.tree.map(lambda x: _global_array(x, self.batch_sharding), batch)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
                            batch)

    def host_state(self, state):
        return state


class DataParallel(_Sharded):
    """Strategy ``dp``: shard_map over all devices, replicated params, gradient pmean inside the step."""

    name = "dp"
    axis_name = "data"

    def __init__(self, mesh):
        if mesh.shape["fsdp"] != 1 or mesh.shape["model"] != 1:
            raise ValueError(f"parallel.strategy=dp puts every device on the data axis; got mesh {dict(mesh.shape)}")
        super().__init__(mesh)

    def state_shardings(self, state):
        return jax.tree.map(lambda _: self.replicated, state)

    def place_state(self, state):
        return _place(state, self.state_shardings(state))

    def _map(self, fn, out_specs):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(BATCH_AXES)), out_specs=out_specs,
                             check_vma=False)

    def compile_train(self, train_step: Callable) -> Callable:
        return jax.jit(self._map(train_step, (P(), P())), donate_argnums=(0,))

    def compile_eval(self, eval_step: Callable) -> Callable:
        return jax.jit(self._map(eval_step, P()))


def path_name(path) -> str:
    """A leaf's path as the rules read it, "block3/mlp/fc1/kernel" (fsdp_rules, optimizer.param_rules)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def parse_rules(text: str) -> list[tuple[str, str]]:
    """'regex=spec;regex=spec' -> [(regex, spec)]; spec is 'auto' (shard the largest dimension that the
    fsdp axis divides) or a comma list of axis names / None per dimension, e.g. 'None,fsdp'."""
    rules = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        regex, sep, spec = part.rpartition("=")
        if not sep or not regex:
            raise ValueError(f"parallel.fsdp_rules entry {part!r} must look like 'regex=auto' or 'regex=None,fsdp'")
        re.compile(regex)
        rules.append((regex, spec.strip()))
    return rules


def partition_specs(tree, rules: list[tuple[str, str]], fsdp_size: int):
    """A PartitionSpec per leaf of ``tree`` (params, optimizer state): the first rule whose regex matches
    the leaf's path decides; unmatched leaves and scalars are replicated."""

    def spec_for(path, leaf):
        name, shape = path_name(path), np.shape(leaf)
        for regex, spec in rules:
            if not re.search(regex, name) or not shape:
                continue
            if spec == "auto":
                dims = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp_size == 0 and shape[d] >= fsdp_size]
                if not dims or fsdp_size == 1:
                    return P()
                axes = [None] * len(shape)
                axes[dims[0]] = "fsdp"
                return P(*axes)
            axes = [None if a.strip() in ("None", "") else a.strip() for a in spec.split(",")]
            if len(axes) != len(shape):
                raise ValueError(f"parallel.fsdp_rules spec {spec!r} has {len(axes)} entries but {name} has "
                                 f"shape {shape}")
            return P(*axes)
        return P()

    return jax.tree_util.tree_map_with_path(spec_for, tree)


class FullyShardedDataParallel(_Sharded):
    """Strategy ``fsdp``: jit + NamedSharding; params and optimizer state sharded by regex rules."""

    name = "fsdp"
    axis_name = None

    def __init__(self, mesh, rules: str = r".*=auto"):
        super().__init__(mesh)
        self.rules = parse_rules(rules)
        self._state_shardings = None

    def state_shardings(self, state):
        specs = partition_specs(state, self.rules, self.mesh.shape["fsdp"])
        self._state_shardings = jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), specs,
                                             is_leaf=lambda x: isinstance(x, P))
        return self._state_shardings

    def place_state(self, state):
        return _place(state, self.state_shardings(state))

    def _gathered(self, step: Callable) -> Callable:
        """``step`` with the params all-gathered where the model uses them, so every activation stays
        sharded over the batch. Left to itself, XLA's partitioner may keep a layer's output in its kernel's
        sharding and all-gather activations instead (it does, for the digits CNN). The params are stored and
        updated sharded (out_shardings); only the forward/backward sees them whole."""

        def gathered(state, batch):
            params = jax.lax.with_sharding_constraint(state.params, self.replicated)
            with kernels_per_shard(self.mesh, BATCH_AXES):  # Pallas custom calls run on each batch shard
                return step(state.replace(params=params), batch)

        return gathered

    def compile_train(self, train_step: Callable) -> Callable:
        if self._state_shardings is None:
            raise RuntimeError("fsdp: call place_state before compile_train (it fixes the state shardings)")
        return jax.jit(self._gathered(train_step), in_shardings=(self._state_shardings, self.batch_sharding),
                       out_shardings=(self._state_shardings, self.replicated), donate_argnums=(0,))

    def compile_eval(self, eval_step: Callable) -> Callable:
        return jax.jit(self._gathered(eval_step), in_shardings=(self._state_shardings, self.batch_sharding),
                       out_shardings=self.replicated)


class Pmap:
    """Strategy ``pmap`` (legacy): state replicated along a leading axis of local devices."""

    name = "pmap"
    axis_name = "data"

    def __init__(self, mesh):
        if jax.process_count() > 1:
            raise ValueError("parallel.strategy=pmap is single-process here; use dp or fsdp across hosts")
        self.mesh = mesh
        self.devices = list(mesh.devices.flat)
        self.n = len(self.devices)
        # pmap takes arrays split along their leading axis, one slice per device.
        self._sharding = NamedSharding(jax.sharding.Mesh(np.asarray(self.devices), ("pmap",)), P("pmap"))

    def _put(self, stacked: np.ndarray) -> jax.Array:
        """(n_devices, ...) host array -> one slice per device, as pmap expects."""
        return jax.device_put(stacked, self._sharding)

    def state_shardings(self, state):
        """The first device: pmap's stacked copies are made from it by ``place_state`` (via the host)."""
        one = jax.sharding.SingleDeviceSharding(self.devices[0])
        return jax.tree.map(lambda _: one, state)

    def place_state(self, state):
        return jax.tree.map(lambda x: self._put(np.stack([x] * self.n)), _to_numpy(state))

    def host_state(self, state):
        return jax.tree.map(lambda x: x[0], state)

    def place_batch(self, batch, is_global: bool = False):
        return jax.tree.map(lambda x: self._put(np.asarray(x).reshape((self.n, -1) + np.shape(x)[1:])), batch)

    def compile_train(self, train_step: Callable) -> Callable:
        mapped = jax.pmap(train_step, axis_name="data", donate_argnums=(0,), devices=self.devices)

        def step(state, batch):
            state, metrics = mapped(state, batch)
            return state, jax.tree.map(lambda m: m[0], metrics)

        return step

    def compile_eval(self, eval_step: Callable) -> Callable:
        mapped = jax.pmap(eval_step, axis_name="data", devices=self.devices)
        return lambda state, batch: jax.tree.map(lambda m: m[0], mapped(state, batch))


STRATEGIES = {"none": SingleDevice, "dp": DataParallel, "fsdp": FullyShardedDataParallel, "pmap": Pmap}


def get_strategy(name: str, mesh, *, batch_size: int | None = None, eval_batch_size: int | None = None,
                 fsdp_rules: str | None = None):
    """The strategy ``name`` (config ``parallel.strategy``) over ``mesh``; checks the batch sizes divide."""
    if name not in STRATEGIES:
        raise ValueError(f"parallel.strategy={name!r} is unknown; choose one of: {', '.join(STRATEGIES)}")
    shards = 1 if name == "none" else mesh.shape["data"] * mesh.shape["fsdp"]
    for key, value in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size)):
        if value is not None and value % shards:
            raise ValueError(f"{key}={value} is not divisible by {shards} devices "
                             f"(parallel.strategy={name}, mesh {dict(mesh.shape)})")
    if name == "fsdp" and fsdp_rules is not None:
        return FullyShardedDataParallel(mesh, fsdp_rules)
    return STRATEGIES[name](mesh)
