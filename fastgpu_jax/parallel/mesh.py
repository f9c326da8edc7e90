"""Device mesh with axes (data, fsdp, model), Auto axis types so jit propagates shardings."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "model")


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """'data=4,fsdp=2' -> {'data': 4, 'fsdp': 2, 'model': 1}; '' puts every device on ``data``."""
    sizes = {"data": num_devices if not spec else 1, "fsdp": 1, "model": 1}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in AXES or not value.isdigit() or int(value) < 1:
            raise ValueError(f"parallel.mesh entry {part!r} is invalid; expected e.g. 'data=8,fsdp=1' with "
                             f"axes {', '.join(AXES)}")
        sizes[name] = int(value)
    total = int(np.prod(list(sizes.values())))
    if total != num_devices:
        raise ValueError(f"parallel.mesh={spec!r} spans {total} devices but {num_devices} are available")
    return sizes


def make_mesh(mesh_spec="", devices=None) -> Mesh:
    """A mesh over ``devices`` (default: all) shaped by ``mesh_spec`` (see ``parse_mesh``); a config may
    be passed instead of the spec (its ``parallel.mesh`` is used)."""
    if not isinstance(mesh_spec, str):
        mesh_spec = mesh_spec.parallel.mesh
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(mesh_spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    grid = np.asarray(devices).reshape(shape)
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return Mesh(grid, AXES, axis_types=auto)
