"""fastgpu_jax.models.vit: registry shapes, published parameter counts, attention against a hand-written
reference, every projection through the op backend, bf16 compute with float32 params, dropout, a tiny ViT
that learns digits through the library's train_step, the configs, and a tiny end-to-end ``fg.train``."""

import math
import os

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fastgpu_jax as fg
from fastgpu_jax import config as config_lib
from fastgpu_jax import models
from fastgpu_jax.models import vit as vit_lib
from fastgpu_jax.nn import backend as B

KEY = jax.random.key(0, impl="rbg")  # cheap to sample on CPU (see test_models.py)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# registry name -> (variant, patch)
VITS = {"vit_ti16": ("Ti", 16), "vit_s16": ("S", 16), "vit_b16": ("B", 16),
        "vit_ti4": ("Ti", 4), "vit_s4": ("S", 4), "vit_b4": ("B", 4)}
# timm / torchvision counts at 224x224, 1000 classes (class token + 197-row position embedding included).
PUBLISHED_PARAMS = {"vit_b16": 86_567_656, "vit_s16": 22_050_664, "vit_ti16": 5_717_416}
TINY = dict(num_classes=10, patch=4, width=32, depth=2, num_heads=2, mlp_dim=64)


def _shape(name, batch=2):
    size = 224 if name.endswith("16") else 32
    return (batch, size, size, 3)


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _abstract_init(model, shape):
    return jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct(shape, jnp.float32))


def _init(model, x):
    return jax.jit(model.init)(KEY, x)


def _apply(model, variables, x, **kwargs):
    """model.apply, jitted (op-by-op dispatch of a whole ViT costs seconds on CPU)."""
    return jax.jit(lambda v, inp: model.apply(v, inp, **kwargs))(variables, x)


def _count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _kernels(params):
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if getattr(path[-1], "key", None) == "kernel"]


# --- shapes and parameter counts --------------------------------------------------------------------

@pytest.mark.parametrize("name", VITS)
def test_registry_output_shapes(name):
    shape = _shape(name)
    model = models.build(name, num_classes=10)
    variables = _abstract_init(model, shape)
    assert set(variables) == {"params"}
    variant, patch = VITS[name]
    width, depth, heads, mlp = vit_lib.VIT_VARIANTS[variant]
    assert (model.patch, model.width, model.depth, model.num_heads, model.mlp_dim) == (patch, width, depth,
                                                                                     heads, mlp)
    params = variables["params"]
    assert params["patch_embed"]["kernel"].shape == (patch, patch, 3, width)
    assert params["pos_embedding"].shape == (1, 1 + (shape[1] // patch) ** 2, width)
    assert sum(k.startswith("block") for k in params) == depth
    for train in (False, True):
        logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=train), variables,
                                jax.ShapeDtypeStruct(shape, jnp.float32))
        assert logits.shape == (shape[0], 10) and logits.dtype == jnp.float32
    assert name in config_lib.MODEL_NAMES


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published(name):
    variables = _abstract_init(models.build(name, num_classes=1000), (1, 224, 224, 3))
    assert _count(variables["params"]) == PUBLISHED_PARAMS[name]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))


def test_registry_ignores_width_stem_and_bn_axis():
    shape = _shape("vit_ti4")
    base = _abstract_init(models.build("vit_ti4"), shape)
    other = _abstract_init(models.build("vit_ti4", width=7, stem="cifar", bn_axis_name="data"), shape)
    assert jax.tree.map(lambda a: a.shape, base) == jax.tree.map(lambda a: a.shape, other)


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="patches"):
        _abstract_init(models.build("vit_ti16"), (1, 32, 40, 3))
    with pytest.raises(ValueError, match="variant"):
        vit_lib.build_vit("L", 16)
    with pytest.raises(ValueError, match="num_heads"):
        _abstract_init(vit_lib.ViT(**{**TINY, "num_heads": 3}), (1, 8, 8, 1))
    with pytest.raises(ValueError, match="attention_impl"):
        _abstract_init(vit_lib.ViT(**TINY, attention_impl="flash"), (1, 8, 8, 1))


# --- attention --------------------------------------------------------------------------------------

def _reference_attention(params, x, heads):
    """softmax(Q Kᵀ / sqrt(d)) V per head, in numpy float64, then the output projection."""
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    b, t, d = x.shape
    hd = d // heads
    qkv = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, t, heads, hd).transpose(0, 2, 1, 3) for i in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return y @ p["out"]["kernel"] + p["out"]["bias"]


@pytest.mark.parametrize("impl", [None, "xla", "auto"])
def test_attention_matches_handwritten_softmax(impl):
    heads, x = 3, _x((2, 5, 24), seed=1)
    block = vit_lib.MultiHeadSelfAttention(num_heads=heads, attention_impl=impl)
    init = _init(block, x)["params"]
    params = jax.tree.map(lambda a: a + 0.1 * _x(a.shape, seed=2), init)  # non-zero biases too
    got = _apply(block, {"params": params}, x)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, _reference_attention(params, x, heads), rtol=1e-5, atol=1e-5)
    # The qkv kernel init has the variance of three separate xavier (d, d) kernels: limit sqrt(6 / 2d).
    kernel = init["qkv"]["kernel"]
    assert kernel.shape == (24, 72) and float(jnp.abs(kernel).max()) <= math.sqrt(6 / 48)


# --- every projection goes through the op backend ----------------------------------------------------

@pytest.mark.parametrize("name", VITS)
def test_every_kernel_goes_through_the_backend(name):
    shape = _shape(name, batch=1)
    model = models.build(name, num_classes=10)
    with B.record_ops() as calls:
        variables = _abstract_init(model, shape)
    kernels = _kernels(variables["params"])
    assert len(calls) == len(kernels) == 1 + 4 * model.depth + 1  # patch, (qkv, out, fc1, fc2) x depth, head
    assert [op for op, _, _ in calls].count("conv2d") == sum(k.ndim == 4 for k in kernels) == 1
    assert [op for op, _, _ in calls].count("matmul") == sum(k.ndim == 2 for k in kernels)
    assert {backend for _, backend, _ in calls} == {"xla"}


def test_tiny_vit_follows_use_backend(monkeypatch):
    """Under ``use_backend("pallas")`` every projection dispatches to the pallas implementation (here a
    recording stand-in that computes the xla op, so the logits must be identical)."""
    model = vit_lib.ViT(**TINY, head_zero_init=False)
    x = _x((2, 8, 8, 1))
    variables = _init(model, x)
    want = _apply(model, variables, x)
    used = []
    for op in B.OPS:
        xla = B._IMPLS[op]["xla"]
        monkeypatch.setitem(B._IMPLS[op], "pallas",
                            lambda *a, _op=op, _f=xla, **k: (used.append(_op), _f(*a, **k))[1])
    with fg.nn.use_backend("pallas"), B.record_ops() as calls:
        got = _apply(model, variables, x)  # traced here, so under use_backend
    np.testing.assert_array_equal(got, want)
    assert len(used) == len(calls) == len(_kernels(variables["params"]))
    assert {backend for _, backend, _ in calls} == {"pallas"}


# --- precision and dropout -----------------------------------------------------------------------------

def test_bf16_compute_keeps_float32_params():
    x = _x((2, 8, 8, 1))
    m32 = vit_lib.ViT(**TINY, head_zero_init=False)
    m16 = vit_lib.ViT(**TINY, head_zero_init=False, dtype=jnp.bfloat16)
    v32, v16 = _init(m32, x), _init(m16, x)
    for a, b in zip(jax.tree_util.tree_leaves(v16), jax.tree_util.tree_leaves(v32)):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
    # Every submodule's output is bf16 (abstractly), and so are the logits.
    _, inter = jax.eval_shape(lambda v, inp: m16.apply(v, inp, capture_intermediates=True,
                                                       mutable=["intermediates"]), v16, x)
    outputs = jax.tree_util.tree_leaves(inter["intermediates"])
    assert len(outputs) > 10 and all(o.dtype == jnp.bfloat16 for o in outputs)
    y16, y32 = _apply(m16, v16, x), _apply(m32, v32, x)
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
    scale = float(jnp.abs(y32).max())
    assert scale > 0
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05 * scale + 1e-3, rtol=0.05)
    # Registry models pass the dtype through.
    assert models.build("vit_ti4", dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_dropout_is_random_in_train_and_off_in_eval():
    x = _x((2, 8, 8, 1))
    model = vit_lib.ViT(**TINY, head_zero_init=False, dropout_rate=0.3)
    variables = _init(model, x)
    k1, k2 = jax.random.key(1, impl="rbg"), jax.random.key(2, impl="rbg")
    train = jax.jit(lambda v, inp, k: model.apply(v, inp, train=True, rngs={"dropout": k}))
    t1 = train(variables, x, k1)
    np.testing.assert_array_equal(t1, train(variables, x, k1))
    assert not np.allclose(t1, train(variables, x, k2))
    e = _apply(model, variables, x, train=False)
    no_dropout = vit_lib.ViT(**TINY, head_zero_init=False)
    np.testing.assert_allclose(e, _apply(no_dropout, variables, x, train=True), rtol=1e-5, atol=1e-5)
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(lambda v, inp: model.apply(v, inp, train=True), variables, x)


# --- training through the library ------------------------------------------------------------------------

def test_tiny_vit_learns_digits_with_train_step():
    model = vit_lib.ViT(**TINY, dropout_rate=0.1)
    tx = optax.adamw(3e-3, weight_decay=1e-4)
    state = fg.state.create_train_state(model, tx, seed=0, input_shape=(1, 8, 8, 1))
    # Reference ViT init: zero head and class token, random position embedding.
    np.testing.assert_array_equal(state.params["head"]["kernel"], 0.0)
    np.testing.assert_array_equal(state.params["cls_token"], 0.0)
    assert float(jnp.std(state.params["pos_embedding"])) > 0.01
    step = jax.jit(fg.steps.train_step)
    batches = fg.data.train_iterator("digits", batch_size=32, seed=0)
    losses = []
    for _ in range(60):
        state, metrics = step(state, next(batches))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[0] == pytest.approx(math.log(10), rel=1e-3)  # zero-initialised head: uniform logits
    assert np.mean(losses[-10:]) < 0.6 * losses[0], losses
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state.params))


# --- configs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, name", [("configs/cifar10_vit_s4.py", "vit_s4"),
                                        ("configs/imagenet_vit_b16_synthetic.py", "vit_b16")])
def test_configs_load(path, name):
    path = os.path.join(ROOT, path)
    full = fg.load_config(path, overrides=["data.dir=somewhere"] if "cifar" in path else [])
    assert full.model.name == name and full.train.precision == "bfloat16"
    assert full.optimizer.name == "adamw" and full.optimizer.schedule == "warmup_cosine"
    small = fg.load_config(path + (":smoke" if "cifar" in path else ":tiny"))
    assert small.model.name == name and small.data.name == "synthetic" and small.data.image_size == 32
    assert small.train.steps <= 5
    with pytest.raises(ValueError, match="variant"):
        fg.load_config(path + ":nope")


def test_cifar_config_is_cifar_with_augmentation():
    cfg = fg.load_config(os.path.join(ROOT, "configs/cifar10_vit_s4.py"), overrides=["data.dir=somewhere"])
    assert cfg.data.name == "cifar10" and cfg.data.augment and cfg.model.num_classes == 10


def test_tiny_vit_end_to_end_train(tmp_path, monkeypatch):
    """``fg.train`` (bf16, AdamW, checkpoint, final eval) with a tiny ViT registered for this test only.
    The configs' own ``:tiny`` / ``:smoke`` variants keep the full ViT-B/16 / ViT-S/4 networks and take
    35-50 s on a 2-core CPU (mostly XLA compiling the 12-block train step), so they are not run here."""
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # the registration ends with this test
    monkeypatch.setattr(models, "_KEYS", dict(models._KEYS))
    models.register("vit_test_tiny", lambda num_classes, width, dropout_rate, stem, dtype, bn_axis_name=None:
                    vit_lib.ViT(**{**TINY, "num_classes": num_classes}, dropout_rate=dropout_rate, dtype=dtype),
                    accepts=("dropout_rate",))
    cfg = fg.load_config(os.path.join(ROOT, "configs/digits_cnn.py:quick"), overrides=[
        "model.name=vit_test_tiny", "model.width=0", "optimizer.name=adamw", "optimizer.weight_decay=0.01",
        "train.precision=bfloat16", "train.steps=30", "train.eval_every_steps=0", "train.checkpoint_every_steps=30",
        "log.tensorboard=False", "log.progress_bar=False"])
    summary = fg.train(cfg, workdir=str(tmp_path))
    assert summary["step"] == cfg.train.steps and os.listdir(tmp_path / "checkpoints")
    assert summary["val"]["accuracy"] > 0.4, summary  # chance: 0.1
