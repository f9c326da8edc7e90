"""Meshes, strategies and multi-host start-up: the one place that decides how a step is sharded.

``make_mesh`` (mesh.py) lays devices out on (data, fsdp, model); ``get_strategy`` (strategies.py) turns the
pure step functions into compiled, sharded callables; ``initialize`` (distributed.py) joins a multi-host run.
"""

from fastgpu_jax.parallel.distributed import initialize
from fastgpu_jax.parallel.mesh import AXES, make_mesh, parse_mesh
from fastgpu_jax.parallel.strategies import (
    STRATEGIES, DataParallel, FullyShardedDataParallel, Pmap, SingleDevice, get_strategy, parse_rules,
    partition_specs)

__all__ = ["AXES", "STRATEGIES", "DataParallel", "FullyShardedDataParallel", "Pmap", "SingleDevice",
           "get_strategy", "initialize", "make_mesh", "parse_mesh", "parse_rules", "partition_specs"]
