"""Runs with 8 fake CPU devices (set XLA_FLAGS before jax loads): creates a ViT's train state under fsdp and
prints, as JSON on its last line, the share of each leaf that one device holds right after init and after a
restore, the bytes of state one device holds, and the compiled train step's per-device argument bytes under
fsdp and under none.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/fsdp_worker.py WORKDIR VARIANT [--compile]

VARIANT: "tiny" (2 blocks of width 64: quick to compile) or a ViT name such as "S16" (ViT-S/16 at 224x224).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fastgpu_jax import checkpoint, models, parallel, steps  # noqa: E402
from fastgpu_jax.state import create_train_state, with_shardings  # noqa: E402


def _model(variant: str):
    if variant == "tiny":
        return models.ViT(num_classes=10, patch=4, width=64, depth=2, num_heads=4, mlp_dim=128), 16
    return models.build_vit(variant[0], int(variant[1:]), num_classes=1000), 224


def _fractions(state) -> dict:
    """{leaf path: [bytes on device 0 / bytes of the leaf, some dim divisible by the device count]}."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path((state.params, state.opt_state)):
        shard = next(s for s in leaf.addressable_shards if s.device == jax.devices()[0])
        divisible = any(d % jax.device_count() == 0 for d in leaf.shape)
        out[jax.tree_util.keystr(path)] = [shard.data.nbytes / max(leaf.nbytes, 1), divisible]
    return out


def _device0_bytes(state) -> int:
    return sum(s.data.nbytes for leaf in jax.tree.leaves(state) for s in leaf.addressable_shards
               if s.device == jax.devices()[0])


def _argument_bytes(strategy, abstract, size: int) -> int:
    """Per-device argument bytes of the compiled train step (state + a batch of 16)."""
    batch_sharding = getattr(strategy, "batch_sharding", jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    batch = {"image": jax.ShapeDtypeStruct((16, size, size, 3), np.float32, sharding=batch_sharding),
             "label": jax.ShapeDtypeStruct((16,), np.int32, sharding=batch_sharding)}
    target = with_shardings(abstract, strategy.state_shardings(abstract))
    compiled = strategy.compile_train(steps.train_step).lower(target, batch).compile()
    return int(compiled.memory_analysis().argument_size_in_bytes)


if __name__ == "__main__":
    workdir, variant, want_compile = sys.argv[1], sys.argv[2], "--compile" in sys.argv
    jax.config.update("jax_threefry_partitionable", True)
    model, size = _model(variant)
    make = lambda **kw: create_train_state(model, optax.adam(1e-3), seed=0, input_shape=(1, size, size, 3), **kw)  # noqa
    mesh = parallel.make_mesh("fsdp=8")
    fsdp = parallel.get_strategy("fsdp", mesh)
    abstract = make(abstract=True)
    shardings = fsdp.state_shardings(abstract)
    state = make(shardings=shardings)  # one jit, out_shardings: born sharded
    out = {"after_init": _fractions(state), "device0_bytes": _device0_bytes(state),
           "state_bytes": sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))}
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    ckpt.save(1, state, {}, {"pending": []})
    restored = ckpt.restore_latest(with_shardings(abstract, shardings))[0]
    ckpt.close()
    out["after_restore"] = _fractions(restored)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if want_compile:
        out["fsdp_argument_bytes"] = _argument_bytes(fsdp, abstract, size)
        none = parallel.get_strategy("none", parallel.make_mesh("data=8"))
        out["none_argument_bytes"] = _argument_bytes(none, abstract, size)
    print(json.dumps(out))
