"""Research recipes: label smoothing, mixup/cutmix, stochastic depth, top-5, weight EMA, keep_best, early stopping.

References are numpy formulas of the papers (label smoothing, Beta moments, the EMA recurrence, top-k) and the
runs' own logs (the best checkpoint is the best logged evaluation). Device-count invariance of these recipes on 8
fake devices is part of tests/test_parallel.py's resnet run, which turns them all on.
"""

import json

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastgpu_jax as fg
from fastgpu_jax import mix, steps
from fastgpu_jax.mix import MixOptions
from fastgpu_jax.nn import DropPath
from fastgpu_jax.state import StepOptions
from fastgpu_jax.writers import read_metrics


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --- losses and metrics --------------------------------------------------------------------------------------

def test_label_smoothing_and_mixed_targets_follow_the_formula():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 7)).astype(np.float32), rng.integers(0, 7, 6)
    lam = rng.uniform(size=6).astype(np.float32)
    eps, k = 0.1, 7
    soft = np.full((6, k), eps / k) + (1 - eps) * np.eye(k)[labels]  # Szegedy et al.: (1 - e) y + e / K
    partner = soft.reshape(3, 2, k)[:, ::-1].reshape(6, k)
    mixed = lam[:, None] * soft + (1 - lam[:, None]) * partner
    expected_smooth = -(soft * _log_softmax(logits)).sum(-1).mean()
    expected_mixed = -(mixed * _log_softmax(logits)).sum(-1).mean()
    opts = StepOptions(label_smoothing=eps)
    np.testing.assert_allclose(steps.train_loss(jnp.asarray(logits), labels, opts), expected_smooth, rtol=1e-5)
    np.testing.assert_allclose(steps.train_loss(jnp.asarray(logits), labels, opts, jnp.asarray(lam)), expected_mixed,
                               rtol=1e-5)
    plain = -_log_softmax(logits)[np.arange(6), labels].mean()
    np.testing.assert_allclose(steps.train_loss(jnp.asarray(logits), labels, StepOptions()), plain, rtol=1e-5)


def test_top5_counts_labels_among_the_five_largest_logits():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(50, 12)).astype(np.float32), rng.integers(0, 12, 50)
    mask = (rng.uniform(size=50) > 0.3).astype(np.float32)
    top5 = np.argsort(-logits, -1)[:, :5]
    expected = sum(m for row, y, m in zip(top5, labels, mask) if y in row)
    out = steps.compute_metrics(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    np.testing.assert_allclose(out["top5_correct"], expected)
    assert "top5_correct" not in steps.compute_metrics(jnp.asarray(logits[:, :5]), jnp.asarray(labels % 5))


# --- mixup / cutmix --------------------------------------------------------------------------------------------

def _images(rows=8, size=16):
    # Every pixel of every image distinct, so which image a pixel came from is readable.
    return jnp.arange(rows * size * size * 3, dtype=jnp.float32).reshape(rows, size, size, 3) + 1


def test_mixup_blends_each_row_with_its_neighbour_by_its_lam():
    x, key = _images(), jax.random.key(3)
    out, lam = mix.mix_images(x, jnp.arange(8), key, MixOptions(mixup_alpha=0.4))
    other = np.asarray(x).reshape(4, 2, 16, 16, 3)[:, ::-1].reshape(x.shape)
    lam = np.asarray(lam)
    assert np.all((lam > 0) & (lam < 1)) and len(set(lam.round(6))) == 8  # one draw per example
    np.testing.assert_allclose(out, lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * other, rtol=1e-6)


def test_cutmix_pastes_a_box_of_the_neighbour_whose_area_is_1_minus_lam():
    x = _images()
    out, lam = mix.mix_images(x, jnp.arange(8), jax.random.key(4), MixOptions(cutmix_alpha=1.0))
    out, x = np.asarray(out), np.asarray(x)
    other = x.reshape(4, 2, 16, 16, 3)[:, ::-1].reshape(x.shape)
    for r in range(8):
        from_other = np.all(out[r] == other[r], -1)
        assert np.all(from_other | np.all(out[r] == x[r], -1))  # every pixel is one image's or the other's
        ys, xs = np.nonzero(from_other)
        if len(ys):  # the pasted pixels form one rectangle
            assert from_other[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
        np.testing.assert_allclose(lam[r], 1 - from_other.mean(), atol=1e-6)


def test_mixing_draws_depend_on_the_example_not_on_the_shard():
    """The rows 0..7 mixed at once equal rows 0..3 and 4..7 mixed apart (two devices, or two micro-batches)."""
    x, key = _images(), jax.random.key(5)
    opts = MixOptions(mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.8)
    mixed = jax.jit(mix.mix_images, static_argnums=3)
    whole, lam = mixed(x, jnp.arange(8), key, opts)
    halves = [mixed(x[i:i + 4], jnp.arange(i, i + 4), key, opts) for i in (0, 4)]
    np.testing.assert_array_equal(whole, jnp.concatenate([h[0] for h in halves]))
    np.testing.assert_array_equal(lam, jnp.concatenate([h[1] for h in halves]))
    with pytest.raises(ValueError, match="even number of rows"):
        mix.mix_images(x[:3], jnp.arange(3), key, opts)


def test_mix_probabilities_and_beta_moments():
    ids, key = jnp.arange(4000), jax.random.key(6)

    def draws(ids, opts):
        return jax.jit(jax.vmap(lambda i: mix.draw(jax.random.fold_in(key, i), opts, 8, 8)))(ids)

    d = draws(ids, MixOptions(0.4, 1.0, 0.25, 0.6))
    applied = np.asarray(d["lam"]) < 1
    assert abs(applied.mean() - 0.6) < 0.03  # mixup_prob (lam == 1 exactly only when not applied)
    assert abs(np.asarray(d["cut"])[applied].mean() - 0.25) < 0.03  # switch_prob among the mixed
    alpha = 0.4
    lam = np.asarray(draws(ids, MixOptions(mixup_alpha=alpha))["lam"])
    assert abs(lam.mean() - 0.5) < 0.02 and abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.01  # Beta(a, a)
    none = MixOptions(mixup_alpha=alpha, prob=0.0)
    out, lam0 = mix.mix_images(_images(), jnp.arange(8), key, none)
    np.testing.assert_array_equal(out, _images())
    np.testing.assert_array_equal(lam0, 1.0)


# --- stochastic depth ------------------------------------------------------------------------------------------

def test_drop_path_zeroes_whole_examples_and_rescales_the_rest():
    x = jnp.ones((2000, 3, 4))
    out = np.asarray(DropPath(0.3).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    per_row = out.reshape(2000, -1)
    assert np.all((per_row == 0).all(1) | np.isclose(per_row, 1 / 0.7).all(1))
    assert abs((per_row == 0).all(1).mean() - 0.3) < 0.04
    np.testing.assert_array_equal(DropPath(0.3).apply({}, x, deterministic=True), x)


@pytest.mark.parametrize("name, blocks", [("resnet", 3), ("vit", 4)])
def test_drop_path_rate_grows_linearly_over_the_blocks(name, blocks):
    """timm's rule: block i of n drops with rate * i / (n - 1); eval mode is unaffected."""
    from fastgpu_jax.models.resnet import BasicBlock, ResNet
    from fastgpu_jax.models.vit import ViT

    def build(rate):
        if name == "resnet":
            return ResNet(stage_sizes=(1, 2), block=BasicBlock, width=4, stem="cifar", drop_path_rate=rate)
        return ViT(num_classes=10, patch=4, width=16, depth=4, num_heads=2, mlp_dim=32, drop_path_rate=rate)

    model = build(0.2)
    x = jnp.ones((2, 8, 8, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    rates = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, DropPath):
            rates.append(context.module.rate)
        return next_fun(*args, **kwargs)

    with flax_nn.intercept_methods(spy):  # the rates are read while tracing: nothing needs to run
        jax.eval_shape(lambda v: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)},
                                             mutable=["batch_stats"]), variables)
    per_block = sorted(set(rates))
    np.testing.assert_allclose(per_block, np.linspace(0, 0.2, blocks), rtol=1e-6)
    evaluate = jax.jit(lambda m, v: m.apply(v, x), static_argnums=0)
    np.testing.assert_array_equal(evaluate(model, variables), evaluate(build(0.0), variables))


# --- weight EMA ------------------------------------------------------------------------------------------------

def test_ema_decay_warms_up_as_tensorflow_num_updates():
    for warmup in (True, False):
        opts = StepOptions(ema_decay=0.99, ema_warmup=warmup)
        for t in (0, 5, 500, 5000):
            expected = min(0.99, (1 + t) / (10 + t)) if warmup else 0.99
            np.testing.assert_allclose(steps.ema_decay(opts, jnp.asarray(t)), expected, rtol=1e-6)


def test_ema_follows_the_recurrence_over_the_params_trajectory(quick_digits):
    warmup = True
    cfg = quick_digits("train.ema_decay=0.8", "data.batch_size=16")
    state = fg.build_state(cfg)
    batch = {"image": jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 1)), jnp.float32),
             "label": jnp.arange(16) % 10}
    expected = jax.tree.map(np.asarray, state.params)
    step = jax.jit(steps.train_step)
    for t in range(4):
        state, _ = step(state, batch)
        decay = min(0.8, (1 + t) / (10 + t)) if warmup else 0.8
        expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * np.asarray(p), expected, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state.ema["params"], expected)
    viewed = steps.ema_view(state)
    assert viewed.params is state.ema["params"]


# --- whole runs: val_ema rows, keep_best, early stopping, --params ---------------------------------------------

def _simulate_stop(rows: list[dict], patience: int) -> tuple[int | None, int]:
    """(best step, stop step or None) by the rule stated in the docs, from the logged val_ema rows."""
    best, best_step, since = None, None, 0
    for row in rows:
        if best is None or row["accuracy"] > best:
            best, best_step, since = row["accuracy"], row["step"], 0
        else:
            since += 1
            if since >= patience:
                return best_step, row["step"]
    return best_step, None


def test_ema_rows_best_checkpoint_and_early_stopping(quick_digits, tmp_path):
    wd = str(tmp_path / "run")
    overrides = ("train.steps=80", "train.eval_every_steps=10", "train.checkpoint_every_steps=40",
                 "train.keep_checkpoints=1", "train.ema_decay=0.9", "train.keep_best=ema_accuracy",
                 "train.early_stop_patience=2", "optimizer.lr=0.05")
    out = fg.train(quick_digits(*overrides), wd)
    rows = read_metrics(wd)
    ema_rows = [r for r in rows if r["split"] == "val_ema"]
    raw_rows = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in ema_rows] == [r["step"] for r in raw_rows] and "top5_accuracy" in ema_rows[0]
    assert any(a["accuracy"] != b["accuracy"] for a, b in zip(ema_rows, raw_rows))  # two different weight sets
    best_step, stop_step = _simulate_stop(ema_rows, 2)
    assert out["best"]["step"] == best_step and out["step"] == (stop_step or 80)
    assert out.get("stopped_early", False) == (stop_step is not None)
    # The best checkpoint is the logged best and survives the keep-1 rotation of the latest checkpoints.
    best = fg.evaluate(wd, "val", params="ema", which="best")
    best_row = next(r for r in ema_rows if r["step"] == best_step)
    assert best["step"] == best_step and best["accuracy"] == pytest.approx(best_row["accuracy"], abs=1e-9)
    latest_raw = fg.evaluate(wd, "val", params="raw")
    assert latest_raw["params"] == "raw" and latest_raw["accuracy"] == pytest.approx(raw_rows[-1]["accuracy"])
    assert fg.evaluate(wd, "val")["accuracy"] == pytest.approx(ema_rows[-1]["accuracy"])  # auto: the EMA
    info = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert info["train.keep_best"] == "ema_accuracy"


def test_params_ema_without_an_ema_is_a_clear_error(trained_digits):
    with pytest.raises(ValueError, match="kept no weight EMA"):
        fg.evaluate(str(trained_digits), "val", params="ema")
    with pytest.raises(FileNotFoundError, match="checkpoints_best"):
        fg.evaluate(str(trained_digits), "val", which="best")


def test_resumed_ema_and_best_tracking_equal_an_uninterrupted_run(quick_digits, tmp_path):
    common = ("train.ema_decay=0.9", "train.keep_best=loss", "train.eval_every_steps=10",
              "train.checkpoint_every_steps=20", "optimizer.schedule=constant", "optimizer.warmup_steps=0",
              "train.label_smoothing=0.1")
    whole = fg.train(quick_digits(*common, "train.steps=40"), str(tmp_path / "whole"))
    fg.train(quick_digits(*common, "train.steps=20"), str(tmp_path / "cut"))
    resumed = fg.train(quick_digits(*common, "train.steps=40"), str(tmp_path / "cut"))
    assert resumed["best"] == whole["best"]
    _, a, _ = fg.restore_state(str(tmp_path / "whole"), params="ema")
    _, b, _ = fg.restore_state(str(tmp_path / "cut"), params="ema")
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


@pytest.mark.parametrize("overrides, words", [
    (["train.keep_best=ema_accuracy"], "train.ema_decay=0 keeps no EMA"),
    (["train.early_stop_patience=3", "train.eval_every_steps=0"], "evaluates only at the end"),
    (["data.cutmix_alpha=1.0", "data.batch_size=30", "train.grad_accum_steps=2"], "must be even"),
    (["data.mixup_switch_prob=0.2", "data.mixup_alpha=0.2"], "needs both"),
    (["model.drop_path_rate=0.1"], "needs residual blocks"),
    (["train.keep_best=top5_accuracy", "model.num_classes=5"], "more than 5 classes"),
])
def test_recipe_config_mistakes_are_one_line_errors(overrides, words):
    with pytest.raises(fg.ConfigError, match=words) as err:
        fg.build_config({}, overrides)
    assert "\n" not in str(err.value)


# --- train.init_from -------------------------------------------------------------------------------------------

def test_init_from_a_run_starts_from_its_weights(quick_digits, trained_digits, tmp_path, capsys):
    """A run started from another run's workdir begins at that run's params (and its EMA at them too): with a
    vanishing lr its params after 2 steps are the source's."""
    src = str(trained_digits)
    cfg = quick_digits(f"train.init_from={src}", "train.steps=2", "optimizer.lr=1e-12", "optimizer.warmup_steps=0",
                       "train.eval_every_steps=0", "train.ema_decay=0.5")
    fg.train(cfg, str(tmp_path / "ft"))
    out = capsys.readouterr().out
    assert "train.init_from:" in out and "tensors loaded" in out
    _, source, _ = fg.restore_state(src, params="raw")
    for params in ("raw", "ema"):
        _, tuned, _ = fg.restore_state(str(tmp_path / "ft"), params=params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), tuned.params, source.params)


def test_init_from_a_missing_file_is_a_clear_error(quick_digits, tmp_path):
    cfg = quick_digits(f"train.init_from={tmp_path / 'nope.safetensors'}", "train.steps=2", "optimizer.warmup_steps=0")
    with pytest.raises(FileNotFoundError, match="nope.safetensors") as err:
        fg.train(cfg, str(tmp_path / "ft"))
    assert "\n" not in str(err.value) and not (tmp_path / "ft").exists()  # a failed start leaves no workdir


# --- runs written before these keys existed ----------------------------------------------------------------------

def test_a_checkpoint_and_config_from_before_the_ema_field_still_resume(quick_digits, tmp_path):
    """A checkpoint without the ``ema`` field (written by an earlier version) restores into a state that keeps no
    EMA; it is neither called corrupt nor moved. A config.json without the new keys reads as their defaults."""
    import flax.serialization

    from fastgpu_jax import checkpoint, config as config_lib
    from fastgpu_jax.state import with_shardings

    cfg = quick_digits()
    state = fg.build_state(cfg)
    old = flax.serialization.to_state_dict(state)
    del old["ema"]
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(7, old, {"position": 1}, {"pending": []})
    abstract = fg.build_state(cfg, abstract=True)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored, _, _, step = ckpt.restore_latest(with_shardings(abstract, jax.tree.map(lambda _: device, abstract)),
                                               set_aside_corrupt=True)
    ckpt.close()
    assert step == 7 and restored.ema == {} and not (tmp_path / "checkpoints_corrupt").exists()
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
    flat = config_lib.to_flat_dict(cfg)
    older = {k: v for k, v in flat.items() if not k.startswith(("train.ema", "data.mix", "data.cutmix"))}
    assert config_lib.changed_keys(older, flat) == []
