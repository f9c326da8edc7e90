"""Work executed / useful work of the Mosaic GPU conv on ResNet-50's 3x3 convs (batch 256), without a GPU.

Lowers ``jax.grad`` of ``conv2d`` for an H100 from this machine (nothing runs) and reads each kernel launch's
multiply-adds from ``lowering.record_launches``: useful (the conv's own) and executed (with the virtual columns of
the phased HWNC layout, channel and tile padding). Prints a markdown table (BENCHMARKS.md, "Mosaic GPU conv").

    python benchmarks/mosaic_conv_waste.py
"""

import jax
import jax.numpy as jnp

from fastgpu_jax.pallas_kernels import lowering, tuning
from fastgpu_jax.pallas_kernels.conv2d import conv2d

SHAPES = ((56, 64, 1), (56, 128, 2), (28, 128, 1), (28, 256, 2), (14, 256, 1), (14, 512, 2), (7, 512, 1))


def waste(hw: int, channels: int, stride: int, dtype) -> tuple[float, float, float]:
    """(forward, dgrad, wgrad) executed / useful MACs for a 3x3 conv of a 256 x hw x hw x channels input."""
    x = jax.ShapeDtypeStruct((256, hw, hw, channels), dtype)
    w = jax.ShapeDtypeStruct((3, 3, channels, channels), dtype)
    loss = lambda x, w: conv2d(x, w, strides=stride).astype(jnp.float32).sum()  # noqa: E731
    with lowering.lower_for_gpu(), tuning.use_device_kind("H100"), lowering.record_launches() as rows:
        jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, w).lower(lowering_platforms=("cuda",))
    macs = [r["macs"] for r in rows]  # forward, dgrad phase(s), wgrad
    ratio = lambda ms: sum(m[1] for m in ms) / sum(m[0] for m in ms)  # noqa: E731
    return ratio(macs[:1]), ratio(macs[1:-1]), ratio(macs[-1:])


def main() -> None:
    print("| conv (batch 256) | dtype | forward | dgrad | wgrad |")
    print("|---|---|---|---|---|")
    for dtype in (jnp.bfloat16, jnp.float32):
        for hw, channels, stride in SHAPES:
            f, d, w = waste(hw, channels, stride, dtype)
            name = f"{hw}x{hw}x{channels} 3x3 stride {stride}"
            print(f"| {name} | {jnp.dtype(dtype).name} | {f:.2f} | {d:.2f} | {w:.2f} |")


if __name__ == "__main__":
    main()
