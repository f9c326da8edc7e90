"""Vision Transformer (ViT, Dosovitskiy et al. 2021): patch embedding, class token, learned position
embeddings, a pre-LayerNorm encoder (attention and GELU MLP blocks, each ``x + f(LN(x))``), a final
LayerNorm and a linear head on the class token.

Every projection (patch embedding, qkv, attention output, MLP up/down, head) is a ``fastgpu_jax.nn`` layer,
so the op backend (xla | pallas | auto) applies to all of them; the patch embedding is a ``Conv`` with
kernel = stride = patch. Attention itself runs through ``jax.nn.dot_product_attention`` on
(B, T, heads, head_dim) tensors: softmax statistics in float32 whatever the compute dtype.

Variants (``VIT_VARIANTS``): Ti (width 192, depth 12, heads 3, mlp 768), S (384, 12, 6, 1536),
B (768, 12, 12, 3072); patch 16 for 224x224 inputs, patch 4 for 32x32 inputs. The position embedding has one
row per token of the input the model is initialised on (1 + (H/patch) * (W/patch)), so a model must be
applied at the resolution it was initialised at. Parameter counts on 224x224 inputs with 1000 classes equal
timm's / torchvision's: ViT-B/16 86,567,656, ViT-S/16 22,050,664, ViT-Ti/16 5,717,416 (tested). The
registry names are ``vit_{ti,s,b}{16,4}``; the registry ignores ``width``, ``stem`` and ``bn_axis_name``
(the width is fixed per variant and there is no BatchNorm).

Compute runs in ``dtype`` with float32 params; LayerNorm statistics are reduced in float32. Logits come
back in ``dtype`` like the other models (the loss casts them to float32).

Initialisation follows torchvision's / big_vision's ViT: xavier-uniform projections (the fused qkv kernel
is scaled as three separate D x D projections), MLP biases N(0, 1e-6), other biases zero, LeCun-normal
patch embedding, position embedding N(0, 0.02), class token zero, zero-initialised head
(``head_zero_init=False`` gives the head xavier-uniform instead).

Dropout (``dropout_rate``, active only with ``train=True``, drawing from the 'dropout' rng) is applied after
the position embedding, on the attention output projection and after each MLP dense; there is no dropout on
the attention probabilities (``jax.nn.dot_product_attention`` has none). ``drop_path_rate`` is stochastic depth
as timm's ViT: block i of L drops each example's attention and MLP branches with probability
``drop_path_rate * i / (L - 1)`` (per example, so the same on any device count; see ``fastgpu_jax.nn.DropPath``).

``attention_impl`` is passed to ``jax.nn.dot_product_attention`` as ``implementation``: None (default: jax
chooses; in jax 0.10 that is always XLA), ``"xla"``, ``"cudnn"`` (cuDNN flash attention: GPU, bf16/fp16,
head_dim a multiple of 8), or ``"auto"``: cuDNN when the platform is GPU and the compute dtype is bf16/fp16
and jax accepts the shapes at trace time, XLA otherwise. The cuDNN paths have not yet been run on a GPU
with this library, so the default stays None; the registry models use the default.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastgpu_jax.nn import Conv, Dense, DropPath

# name -> (width, depth, num_heads, mlp_dim)
VIT_VARIANTS = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
}

_xavier = nn.initializers.xavier_uniform()
# A fused (D, 3D) qkv kernel with the variance of three separate xavier-uniform (D, D) kernels:
# fan_avg of (D, 3D) is 2D, so scale 2 gives variance 1/D = 2 / (D + D).
_qkv_init = nn.initializers.variance_scaling(2.0, "fan_avg", "uniform")
_LN_EPS = 1e-6
ATTENTION_IMPLS = (None, "xla", "cudnn", "auto")


def _attend(q, k, v, impl: str | None):
    """softmax(q kᵀ / sqrt(head_dim)) v on (B, T, heads, head_dim) arrays."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} is unknown; choose one of: "
                         + ", ".join(map(str, ATTENTION_IMPLS)))
    if impl == "auto":
        if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            try:  # jax checks the cuDNN constraints (version, head dim, ...) while tracing
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        impl = "xla"
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


class MultiHeadSelfAttention(nn.Module):
    """Fused qkv projection -> per-head scaled dot-product attention -> output projection."""

    num_heads: int
    dtype: Any = jnp.float32
    dropout_rate: float = 0.0
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, t, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"ViT width {d} is not divisible by num_heads={self.num_heads}")
        head_dim = d // self.num_heads
        qkv = Dense(3 * d, dtype=self.dtype, kernel_init=_qkv_init, name="qkv")(x)
        qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
        y = _attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attention_impl)
        y = Dense(d, dtype=self.dtype, kernel_init=_xavier, name="out")(y.reshape(b, t, d))
        return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Any = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        dense = functools.partial(Dense, dtype=self.dtype, kernel_init=_xavier,
                                  bias_init=nn.initializers.normal(stddev=1e-6))
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        y = dense(self.mlp_dim, activation="gelu_exact", name="fc1")(x)  # fused epilogue under pallas
        y = drop(y)
        return drop(dense(x.shape[-1], name="fc2")(y))


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    dropout_rate: float = 0.0
    attention_impl: str | None = None
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(nn.LayerNorm, epsilon=_LN_EPS, dtype=self.dtype, param_dtype=jnp.float32)
        drop_path = DropPath(self.drop_path_rate, deterministic=not train)
        x = x + drop_path(MultiHeadSelfAttention(self.num_heads, self.dtype, self.dropout_rate, self.attention_impl,
                                                 name="attn")(norm(name="ln1")(x), train))
        mlp = MlpBlock(self.mlp_dim, self.dtype, self.dropout_rate, name="mlp")
        return x + drop_path(mlp(norm(name="ln2")(x), train))


class ViT(nn.Module):
    """``(images (N, H, W, C), train) -> logits (N, num_classes)``; H and W must be multiples of ``patch``."""

    num_classes: int = 1000
    patch: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    head_zero_init: bool = True
    attention_impl: str | None = None
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        n, h, w, _ = x.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"ViT input {h}x{w} is not divisible into {self.patch}x{self.patch} patches")
        x = x.astype(self.dtype)
        x = Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID", dtype=self.dtype,
                 name="patch_embed")(x)
        x = x.reshape(n, -1, self.width)
        cls = self.param("cls_token", nn.initializers.zeros_init(), (1, 1, self.width), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, self.width)), x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, x.shape[1], self.width),
                         jnp.float32)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x + pos.astype(self.dtype))
        for i in range(self.depth):
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype, self.dropout_rate, self.attention_impl,
                             drop_path_rate=rate, name=f"block{i}")(x, train)
        x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, param_dtype=jnp.float32, name="ln_final")(x)
        head_init = nn.initializers.zeros_init() if self.head_zero_init else _xavier
        return Dense(self.num_classes, dtype=self.dtype, kernel_init=head_init, name="head")(x[:, 0])


def build_vit(variant: str, patch: int, **kwargs) -> ViT:
    """ViT-{Ti,S,B}/patch, e.g. ``build_vit("B", 16, num_classes=1000)``."""
    if variant not in VIT_VARIANTS:
        raise ValueError(f"ViT variant {variant!r} is unknown; choose one of: {', '.join(VIT_VARIANTS)}")
    width, depth, heads, mlp = VIT_VARIANTS[variant]
    return ViT(patch=patch, width=width, depth=depth, num_heads=heads, mlp_dim=mlp, **kwargs)
