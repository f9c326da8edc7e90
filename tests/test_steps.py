"""Train/eval steps: gradient accumulation, mixed precision, loss scaling, non-finite handling, RNG."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fastgpu_jax as fg
from fastgpu_jax import data
from conftest import register_tiny_resnet


def _state(**sections):
    cfg = fg.build_config(sections)
    return cfg, fg.build_state(cfg)


def _batch(n, seed=0):
    it = data.train_iterator("digits", batch_size=n, seed=seed)
    return jax.tree.map(jnp.asarray, next(it))


def _max_rel(a, b):
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12)),
                                         a, b))
    return max(diffs)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_grad_accumulation_matches_the_large_batch(optimizer):
    """With dropout on: each example's mask is keyed by its row in the batch, not by its micro-batch."""
    batch = _batch(32)
    results = []
    for k in (1, 4):
        _, st = _state(train={"grad_accum_steps": k}, data={"batch_size": 32}, model={"dropout_rate": 0.3},
                       optimizer={"name": optimizer, "lr": 0.05 if optimizer == "sgd" else 1e-3})
        step = jax.jit(fg.train_step)
        for _ in range(3):
            st, m = step(st, batch)
        results.append((st.params, float(m["loss"])))
    (p1, l1), (p4, l4) = results
    assert _max_rel(p4, p1) < 1e-4
    assert l4 == pytest.approx(l1, rel=1e-5)


def test_grad_accumulation_memory_is_flat_in_micro_steps():
    temps = {}
    for k, bs in ((2, 16), (8, 64), (1, 64)):
        _, st = _state(train={"grad_accum_steps": k}, data={"batch_size": bs})
        b = {"image": jnp.zeros((bs, 8, 8, 1)), "label": jnp.zeros((bs,), jnp.int32)}
        temps[(k, bs)] = jax.jit(fg.train_step).lower(st, b).compile().memory_analysis().temp_size_in_bytes
    # Same micro-batch (8), 4x the micro-steps: temporaries barely grow; and less than one big batch.
    assert temps[(8, 64)] < 1.25 * temps[(2, 16)]
    assert temps[(8, 64)] < temps[(1, 64)]


@pytest.mark.parametrize("precision, dtype", [("bfloat16", jnp.bfloat16), ("float16", jnp.float16)])
def test_low_precision_trains_with_float32_params(precision, dtype):
    cfg, st = _state(train={"precision": precision, "steps": 40}, optimizer={"lr": 3e-3})
    it = data.train_iterator("digits", batch_size=cfg.data.batch_size, seed=0)
    step = jax.jit(fg.train_step)
    losses = []
    for _ in range(40):
        st, m = step(st, jax.tree.map(jnp.asarray, next(it)))
        losses.append(float(m["loss"]))
        assert int(m["nonfinite"]) == 0
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(st.params))
    logits = fg.predict_step(st, jnp.asarray(next(it)["image"]))
    assert logits.dtype == jnp.float32
    lowp = st.apply_fn(st.variables, jnp.asarray(next(it)["image"]), train=False)
    assert lowp.dtype == dtype
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_float16_overflow_halves_the_loss_scale_and_skips_the_update():
    _, st = _state(train={"precision": "float16", "loss_scale_init": 2.0 ** 60})
    st2, m = jax.jit(fg.train_step)(st, _batch(16))
    assert float(st2.loss_scale) == 2.0 ** 59
    assert int(m["nonfinite"]) == 0  # an overflow is the loss scaler's business, not a NaN event
    assert int(st2.step) == 1
    jax.tree.map(np.testing.assert_array_equal, st2.params, st.params)


def test_float16_loss_scale_grows_after_period_good_steps():
    _, st = _state(train={"precision": "float16", "loss_scale_init": 8.0, "loss_scale_period": 2})
    step = jax.jit(fg.train_step)
    b = _batch(16)
    st, _ = step(st, b)
    assert float(st.loss_scale) == 8.0
    st, _ = step(st, b)
    assert float(st.loss_scale) == 16.0 and int(st.good_steps) == 0


def test_nonfinite_batch_skips_the_update_and_is_reported():
    _, st = _state()
    b = _batch(16)
    b["image"] = b["image"].at[0, 0, 0, 0].set(jnp.nan)
    st2, m = jax.jit(fg.train_step)(st, b)
    assert int(m["nonfinite"]) == 1 and int(st2.step) == 1
    jax.tree.map(np.testing.assert_array_equal, st2.params, st.params)
    jax.tree.map(np.testing.assert_array_equal, st2.opt_state, st.opt_state)


def test_dropout_key_is_a_function_of_seed_and_step():
    _, st = _state(model={"dropout_rate": 0.5})
    b = _batch(16)
    step = jax.jit(fg.train_step)
    a, _ = step(st, b)
    c, _ = step(st, b, jax.random.fold_in(st.rng, st.step))  # the documented default key
    jax.tree.map(np.testing.assert_array_equal, a.params, c.params)
    d, _ = step(st, b, jax.random.fold_in(st.rng, 12345))
    assert _max_rel(d.params, a.params) > 0  # dropout really uses the key


def test_batchnorm_statistics_update_in_training():
    _, st = _state(model={"name": register_tiny_resnet(), "width": 8, "stem": "cifar"}, data={"batch_size": 8})
    st2, _ = jax.jit(fg.train_step)(st, _batch(8))
    before = jax.tree.leaves(st.batch_stats)
    after = jax.tree.leaves(st2.batch_stats)
    assert any(not np.array_equal(x, y) for x, y in zip(before, after))


def test_eval_step_sums_match_a_numpy_reference():
    _, st = _state()
    b = next(data.eval_batches("digits", "test", batch_size=400))  # 360 real rows + 40 padding
    m = jax.jit(fg.eval_step)(st, jax.tree.map(jnp.asarray, b))
    logits = np.asarray(st.apply_fn(st.variables, jnp.asarray(b["image"]), train=False), np.float64)
    real = b["mask"] > 0
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ref_loss = -logp[np.arange(len(logits)), b["label"]][real].sum()
    assert float(m["count"]) == 360
    assert float(m["correct"]) == float((logits.argmax(-1) == b["label"])[real].sum())
    assert float(m["loss_sum"]) == pytest.approx(ref_loss, rel=1e-5)


@pytest.mark.parametrize("name, schedule", [("sgd", "constant"), ("adam", "cosine"), ("adamw", "warmup_cosine"),
                                            ("lamb", "warmup_cosine")])
def test_every_optimizer_reduces_the_loss(name, schedule):
    lr = {"sgd": 0.1, "adam": 3e-3, "adamw": 3e-3, "lamb": 1e-2}[name]
    _, st = _state(optimizer={"name": name, "lr": lr, "schedule": schedule, "warmup_steps": 5,
                              "weight_decay": 1e-4, "grad_clip_norm": 1.0}, train={"steps": 30})
    b = _batch(64)
    step = jax.jit(fg.train_step)
    first = None
    for _ in range(30):
        st, m = step(st, b)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < 0.5 * first


def test_schedules_follow_their_formulas():
    from fastgpu_jax.optim import make_schedule

    cos = make_schedule("cosine", 1.0, 100)
    assert float(cos(0)) == pytest.approx(1.0) and float(cos(50)) == pytest.approx(0.5, abs=1e-6)
    wc = make_schedule("warmup_cosine", 2.0, 100, warmup_steps=10)
    assert float(wc(5)) == pytest.approx(1.0) and float(wc(10)) == pytest.approx(2.0)
    assert float(wc(100)) == pytest.approx(0.0, abs=1e-6)
    assert float(make_schedule("constant", 0.3, 10)(7)) == pytest.approx(0.3)


def test_warmup_acts_under_every_schedule():
    """optimizer.warmup_steps is never ignored: constant and cosine warm up too (optax is the reference)."""
    from fastgpu_jax.optim import make_schedule

    const = make_schedule("constant", 0.4, 100, warmup_steps=10)
    ref = optax.join_schedules([optax.linear_schedule(0.0, 0.4, 10), optax.constant_schedule(0.4)], [10])
    for step in (0, 3, 10, 50):
        assert float(const(step)) == pytest.approx(float(ref(step)))
    assert float(const(5)) == pytest.approx(0.2) and float(const(99)) == pytest.approx(0.4)
    cos, wc = make_schedule("cosine", 1.0, 100, warmup_steps=10), make_schedule("warmup_cosine", 1.0, 100, 10)
    assert [float(cos(s)) for s in (0, 5, 10, 60)] == [float(wc(s)) for s in (0, 5, 10, 60)]
    assert float(cos(5)) == pytest.approx(0.5)


def test_weight_decay_touches_kernels_only():
    from fastgpu_jax.optim import _decay_mask

    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.ones(4)}, "bn": {"scale": jnp.ones(4)},
              "pos_embedding": jnp.ones((1, 5, 8)), "head": {"kernel": jnp.ones((8, 2))}}
    mask = _decay_mask(params)
    assert mask == {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False}, "pos_embedding": False,
                    "head": {"kernel": True}}
