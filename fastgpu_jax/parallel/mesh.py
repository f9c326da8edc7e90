"""Device mesh with axes (data, fsdp, model), Auto axis types so jit propagates shardings."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "model")


def parse_mesh(spec: str, num_devices: int, default_axis: str = "data") -> dict[str, int]:
    """'data=4,fsdp=2' -> {'data': 4, 'fsdp': 2, 'model': 1}; '' puts every device on ``default_axis``."""
    sizes = {"data": 1, "fsdp": 1, "model": 1}
    if not spec:
        sizes[default_axis] = num_devices
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


def make_mesh(mesh_spec="", devices=None, default_axis: str = "data") -> Mesh:
    """A mesh over ``devices`` (default: all, across processes) shaped by ``mesh_spec`` (see ``parse_mesh``).
    A config may be passed instead of the spec: its ``parallel.mesh`` is used, and an empty one puts every
    device on ``fsdp`` for strategy fsdp and on ``data`` otherwise."""
    if not isinstance(mesh_spec, str):
        default_axis = "fsdp" if mesh_spec.parallel.strategy == "fsdp" else "data"
        mesh_spec = mesh_spec.parallel.mesh
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(mesh_spec, len(devices), default_axis)
    shape = tuple(sizes[a] for a in AXES)
    grid = np.asarray(devices).reshape(shape)
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return Mesh(grid, AXES, axis_types=auto)
