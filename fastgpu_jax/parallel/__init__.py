"""Meshes and strategies: the one place that decides how a step is sharded across devices."""

from fastgpu_jax.parallel.mesh import AXES, make_mesh, parse_mesh
from fastgpu_jax.parallel.strategies import SingleDevice, get_strategy

__all__ = ["AXES", "SingleDevice", "get_strategy", "make_mesh", "parse_mesh"]
