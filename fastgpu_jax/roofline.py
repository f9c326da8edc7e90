"""A roofline for the kernels of a train step: FLOPs, minimum HBM bytes and the time an H100 needs at least.

    fastgpu-jax bench --kernels --model resnet50|vit_b16 [--batch 256]

Every matmul and conv a model's forward makes (collected by tracing it through ``nn.backend.record_ops``,
not typed in) gives three kernels of a train step: the forward, the input gradient and the weight gradient.
For each, ``flops`` = 2 x multiply-adds and ``min_bytes`` = each operand read once and the result written
once (the least HBM traffic any implementation can have); the roofline time is
``max(flops / peak, min_bytes / bandwidth)`` with the H100 SXM's datasheet figures (dense bf16 989 TFLOP/s,
TF32 495 TFLOP/s, HBM3 3.35 TB/s). A measured time divided into it is the fraction of roofline reached.
The first layer's input gradient is skipped: a train step never computes it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

H100 = {"bf16_flops": 989e12, "tf32_flops": 495e12, "hbm_bytes_per_s": 3.35e12}


@dataclasses.dataclass(frozen=True)
class KernelShape:
    """One pass of one layer: ``op`` is "matmul" or "conv2d", ``kind`` "fwd" | "dgrad" | "wgrad"."""

    layer: str
    op: str
    kind: str
    x_shape: tuple
    w_shape: tuple
    out_shape: tuple
    strides: tuple = (1, 1)
    padding: object = "SAME"
    count: int = 1  # identical layers in the model
    activation: str | None = None  # a Dense's fused epilogue (``fg.nn.Dense(activation=...)``)

    @property
    def flops(self) -> float:
        macs = math.prod(self.out_shape) * math.prod(self.w_shape[:-1])
        return 2.0 * macs

    def min_bytes(self, itemsize: int) -> float:
        x, w, y = (math.prod(s) for s in (self.x_shape, self.w_shape, self.out_shape))
        return float(x + w + y) * itemsize  # each pass reads two of these and writes the third

    def epilogue_bytes_saved(self, itemsize: int) -> float:
        """HBM bytes the fused bias + activation saves against a matmul kernel followed by an elementwise op.
        Forward: unfused writes z, reads it back and writes y (gelu keeps z for the backward: one pass of
        z is needed anyway; relu keeps y): 1 output-sized pass saved for gelu, 2 for relu. Input gradient:
        unfused computes dz = dy * act'(saved) once (read dy, saved; write dz) and the gradient kernel reads
        dz; fused reads dy and saved inside the kernel: 1 pass saved. Weight gradient: the same, 1 pass."""
        if self.op != "matmul" or self.activation is None:
            return 0.0
        passes = {"fwd": 2 if self.activation == "relu" else 1, "dgrad": 1, "wgrad": 1}[self.kind]
        return float(passes * math.prod(self.out_shape) * itemsize)

    def roofline_s(self, dtype, peaks: dict = H100) -> float:
        itemsize = jnp.dtype(dtype).itemsize
        peak = peaks["tf32_flops"] if itemsize >= 4 else peaks["bf16_flops"]
        return max(self.flops / peak, self.min_bytes(itemsize) / peaks["hbm_bytes_per_s"])


def model_kernel_shapes(name: str, batch: int = 256, image: int = 224, num_classes: int = 1000) -> list[KernelShape]:
    """The distinct (layer shape x pass) kernels of ``name``'s train step, with how often each occurs."""
    from fastgpu_jax import models
    from fastgpu_jax.nn import backend

    model = models.build(name, num_classes=num_classes)
    x = jnp.zeros((batch, image, image, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1]))
    with backend.record_ops() as calls:
        jax.eval_shape(lambda v: model.apply(v, x, mutable=["batch_stats"]) if "batch_stats" in v
                       else model.apply(v, x), variables)
    shapes: dict[tuple, KernelShape] = {}
    for i, (op, _, info) in enumerate(c for c in calls if c[0] in ("matmul", "conv2d")):
        x_shape, w_shape = (tuple(s) for s in info["shape"])
        if op == "matmul":
            w_shape = tuple(w_shape)
            out = x_shape[:-1] + (w_shape[-1],)
            extra = {"activation": (info.get("epilogue") or (False, None))[1]}
            label = f"{math.prod(x_shape[:-1])}x{x_shape[-1]}->{w_shape[-1]}"
        else:
            strides, padding = tuple(info["strides"]), info["padding"]
            out = conv_out_shape(x_shape, w_shape, strides, padding)
            extra = dict(strides=strides, padding=padding)
            kh, kw, cin, cout = w_shape
            label = f"{x_shape[1]}x{x_shape[2]}x{cin}->{cout} k{kh}x{kw} s{strides[0]}"
        for kind in ("fwd", "dgrad", "wgrad"):
            if kind == "dgrad" and i == 0:
                continue  # the input image needs no gradient
            key = (op, kind, x_shape, w_shape, str(extra))
            if key in shapes:
                shapes[key] = dataclasses.replace(shapes[key], count=shapes[key].count + 1)
            else:
                shapes[key] = KernelShape(label, op, kind, x_shape, w_shape, out, **extra)
    return list(shapes.values())


def conv_out_shape(x_shape, w_shape, strides, padding) -> tuple:
    """The NHWC output shape of a conv (no dilation), as XLA computes it."""
    from fastgpu_jax.nn import backend

    y = jax.eval_shape(lambda x, w: backend._xla_conv2d(x, w, strides=strides, padding=padding, dilation=(1, 1)),
                       jax.ShapeDtypeStruct(x_shape, jnp.bfloat16), jax.ShapeDtypeStruct(w_shape, jnp.bfloat16))
    return tuple(y.shape)
