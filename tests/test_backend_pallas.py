"""model.backend=pallas (kernels in interpret mode on CPU) against xla: layers, training, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastgpu_jax as fg
from fastgpu_jax import data, nn as fnn
from conftest import TINY_RESNET, register_tiny_resnet

register_tiny_resnet()


def _rel(a, b):
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("layer, shape", [
    (fnn.Dense(24), (3, 5, 40)),
    (fnn.Conv(12, (3, 3)), (2, 9, 9, 5)),
    (fnn.Conv(12, (3, 3), strides=2, padding="VALID"), (2, 9, 9, 5)),
    (fnn.Conv(12, (1, 1), strides=2), (2, 9, 9, 5)),
])
def test_layers_give_the_same_outputs_and_gradients_on_both_backends(layer, shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    params = layer.init(jax.random.PRNGKey(1), x)

    def loss(p, x):
        return jnp.sum(jnp.sin(layer.apply(p, x)))

    results = {}
    for name in ("xla", "pallas"):
        with fnn.use_backend(name):
            results[name] = (layer.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x))
        with fnn.use_backend(name):  # params created under either backend are the same
            assert jax.tree.map(jnp.shape, layer.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, params)
    assert _rel(results["pallas"], results["xla"]) < 1e-4


def _train(cfg, backend, steps):
    state = fg.build_state(cfg)
    it = data.train_iterator(cfg.data.name, batch_size=cfg.data.batch_size, seed=cfg.seed)
    with fnn.default_backend(backend):
        step = jax.jit(fg.train_step)
        losses = []
        for _ in range(steps):
            state, m = step(state, next(it))
            losses.append(float(m["loss"]))
    return state, losses


@pytest.mark.parametrize("model", [
    {"name": "cnn", "width": 8},
    {"name": TINY_RESNET, "width": 8, "stem": "cifar"},  # every conv kind of a ResNet-18, one block per stage
])
def test_models_train_the_same_with_pallas_and_xla(model):
    # SGD, not Adam: Adam's normalisation turns rounding-level gradient differences on near-zero entries into
    # full-size updates of opposite sign, which says nothing about the kernels.
    cfg = fg.build_config({"model": model, "data": {"batch_size": 16},
                           "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}})
    steps = 6
    s_xla, l_xla = _train(cfg, "xla", steps)
    s_pal, l_pal = _train(cfg, "pallas", steps)
    np.testing.assert_allclose(l_pal, l_xla, rtol=1e-4)
    assert _rel(s_pal.params, s_xla.params) < 1e-3
    assert min(l_xla[1:]) < l_xla[0]  # and it trains


def test_a_checkpoint_trained_with_xla_serves_with_pallas(tmp_path, quick_digits):
    cfg = quick_digits("train.steps=30", "model.width=8")
    fg.train(cfg, str(tmp_path))
    _, state, _ = fg.restore_state(str(tmp_path))
    images = jnp.asarray(next(data.eval_batches("digits", "test", batch_size=32))["image"])
    with fnn.use_backend("xla"):
        ref = fg.predict_step(state, images)
    with fnn.use_backend("pallas"):
        got = jax.jit(fg.predict_step)(state, images)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_auto_is_xla_on_cpu():
    with fnn.use_backend("auto"), fnn.backend.record_ops() as calls:
        jax.eval_shape(lambda: fnn.Dense(4).init(jax.random.PRNGKey(0), jnp.ones((2, 3))))
    assert calls and all(backend == "xla" for _, backend, _ in calls)
