"""Schedules, optimizers, per-parameter rules and layer-wise lr decay (fastgpu_jax.optim), each checked against an
independent reference: the paper's formula in numpy, or optax's own transforms composed directly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fastgpu_jax as fg
from fastgpu_jax import optim

# --- schedules ---------------------------------------------------------------------------------------------


def _values(schedule, steps):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(np.asarray(steps), jnp.int32)), np.float64)


@pytest.mark.parametrize("warmup", [0, 7])
def test_step_schedule_drops_by_the_factor_at_each_boundary_after_a_linear_warmup(warmup):
    lr, steps, factor, fractions = 0.4, 100, 0.2, (0.3, 0.55, 0.8)
    schedule = optim.make_schedule("step", lr, steps, warmup, boundaries=fractions, factor=factor)
    t = np.arange(0, steps + 3)
    drops = (t[:, None] >= np.round(np.array(fractions) * steps)[None]).sum(axis=1)
    want = lr * factor ** drops
    if warmup:
        want = np.where(t < warmup, lr * t / warmup, want)
    np.testing.assert_allclose(_values(schedule, t), want, rtol=1e-6, atol=1e-9)


def _one_cycle_reference(t, lr, steps, rise):
    """Smith & Topin's one-cycle with cosine annealing (as fastai / PyTorch OneCycleLR, optax's defaults):
    lr/25 -> lr over ``rise`` steps, then -> lr/25/1e4 at ``steps``."""
    start, end = lr / 25, lr / 25 / 1e4
    up = start + (lr - start) * (1 - np.cos(np.pi * np.clip(t / rise, 0, 1))) / 2
    down = end + (lr - end) * (1 + np.cos(np.pi * np.clip((t - rise) / (steps - rise), 0, 1))) / 2
    return np.where(t <= rise, up, down)


@pytest.mark.parametrize("warmup, rise", [(0, 30), (29, 29), (7, 7)])  # 0: optax's default pct_start 0.3
def test_one_cycle_rises_over_the_warmup_then_anneals(warmup, rise):
    lr, steps = 0.8, 100
    schedule = optim.make_schedule("one_cycle", lr, steps, warmup)
    t = np.arange(0, steps + 3)
    np.testing.assert_allclose(_values(schedule, t), _one_cycle_reference(t, lr, steps, rise), rtol=1e-5,
                               atol=1e-7)  # float32 near the end of the cosine
    assert float(schedule(rise)) == pytest.approx(lr)


# --- optimizers against optax composed directly -----------------------------------------------------------

_SHAPES = {"dense": {"kernel": (3, 2), "bias": (2,)}, "norm": {"scale": (2,)}}
_KERNELS = {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}


def _tree(shapes, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def _run(tx, shapes, n=3):
    """Params after ``n`` updates of ``tx`` with fixed pseudo-random gradients, and every update."""
    params, updates = _tree(shapes, 0), []
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(n):
        update, state = step(_tree(shapes, i + 1), state, params)
        params = optax.apply_updates(params, update)
        updates.append(update)
    return params, updates


_SCHED = optax.linear_schedule(0.1, 0.02, 3)
_BETAS = {"b1": 0.8, "b2": 0.95}
_CASES = {
    "sgd": (dict(momentum=0.8, nesterov=True, weight_decay=0.01),
            optax.chain(optax.add_decayed_weights(0.01, _KERNELS), optax.sgd(_SCHED, 0.8, nesterov=True))),
    "adam": (dict(weight_decay=0.01, eps=1e-3, **_BETAS),
             optax.chain(optax.add_decayed_weights(0.01, _KERNELS), optax.adam(_SCHED, eps=1e-3, **_BETAS))),
    "adamw": (dict(weight_decay=0.1, eps=1e-3, grad_clip_norm=0.5, **_BETAS),
              optax.chain(optax.clip_by_global_norm(0.5),
                          optax.adamw(_SCHED, eps=1e-3, weight_decay=0.1, mask=_KERNELS, **_BETAS))),
    "lamb": (dict(weight_decay=0.1, eps=1e-3, **_BETAS),
             optax.lamb(_SCHED, eps=1e-3, weight_decay=0.1, mask=_KERNELS, **_BETAS)),
    "lars": (dict(momentum=0.8, nesterov=True, weight_decay=0.01),
             optax.lars(_SCHED, weight_decay=0.01, weight_decay_mask=_KERNELS, trust_ratio_mask=_KERNELS,
                        momentum=0.8, nesterov=True)),
    "lion": (dict(weight_decay=0.1, **_BETAS), optax.lion(_SCHED, weight_decay=0.1, mask=_KERNELS, **_BETAS)),
    "lion defaults": (dict(weight_decay=0.1), optax.lion(_SCHED, weight_decay=0.1, mask=_KERNELS)),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_each_optimizer_updates_as_optax_composed_directly(case):
    kwargs, reference = _CASES[case]
    ours = optim.make_optimizer(case.split()[0], _SCHED, **kwargs)
    for a, b in zip(jax.tree.leaves(_run(ours, _SHAPES)), jax.tree.leaves(_run(reference, _SHAPES))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_betas_an_optimizer_does_not_read_are_refused():
    with pytest.raises(ValueError, match="optimizer.eps"):
        optim.make_optimizer("lion", _SCHED, eps=1e-3)


# --- param_rules -------------------------------------------------------------------------------------------

_GROUPS = {"backbone": {"kernel": (3, 2), "bias": (2,)}, "head": {"kernel": (2, 2), "bias": (2,)}}
# (lr multiplier, weight decay) per leaf under the rules below with weight_decay=0.01 (kernels only by default).
_RULES = "head/kernel=lr:2;head=lr:10,wd:0.5;backbone/bias=wd:0.1"
_EXPECT = {"backbone": {"kernel": (1.0, 0.01), "bias": (1.0, 0.1)},
           "head": {"kernel": (2.0, 0.01), "bias": (10.0, 0.5)}}  # head/kernel: the first rule wins, wd default


def test_param_rules_set_each_groups_lr_and_coupled_weight_decay_under_sgd():
    lr = 0.1
    tx = optim.make_optimizer("sgd", optax.constant_schedule(lr), momentum=0.0, weight_decay=0.01,
                              param_rules=optim.parse_param_rules(_RULES))
    _, updates = _run(tx, _GROUPS, n=2)
    params = _tree(_GROUPS, 0)
    for i, update in enumerate(updates):  # update = -lr * mult * (g + wd * p), p the params before the step
        grads = _tree(_GROUPS, i + 1)
        for group, leaves in _EXPECT.items():
            for leaf, (mult, wd) in leaves.items():
                want = -lr * mult * (grads[group][leaf] + wd * params[group][leaf])
                np.testing.assert_allclose(np.asarray(update[group][leaf]), np.asarray(want), rtol=1e-6)
        params = optax.apply_updates(params, update)


def test_param_rules_under_adamw_equal_one_adamw_per_leaf_with_that_lr_and_decay():
    """adamw is per-leaf, so each leaf must follow a plain optax.adamw(lr * mult, weight_decay=wd): decoupled
    decay scales with the group's lr, as in PyTorch's parameter groups."""
    lr = 0.1
    tx = optim.make_optimizer("adamw", optax.constant_schedule(lr), weight_decay=0.01,
                              param_rules=optim.parse_param_rules(_RULES))
    params, _ = _run(tx, _GROUPS)
    for group, leaves in _EXPECT.items():
        for leaf, (mult, wd) in leaves.items():
            reference, _ = _run(optax.adamw(lr * mult, weight_decay=wd), _GROUPS)
            np.testing.assert_allclose(np.asarray(params[group][leaf]), np.asarray(reference[group][leaf]),
                                       rtol=1e-6, atol=1e-7, err_msg=f"{group}/{leaf}")


# --- layer-wise lr decay -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_shapes():
    from fastgpu_jax.models.vit import ViT

    model = ViT(patch=4, width=16, depth=3, num_heads=2, mlp_dim=32, num_classes=3)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    return jax.tree.map(lambda s: s.shape, abstract)


def _exponent(name: str, depth: int = 3) -> int:
    """BEiT / MAE fine-tuning: block i of L scaled by decay ** (L - i), the embeddings by decay ** (L + 1), the
    final norm and head by 1."""
    top = name.split("/")[0]
    if top.startswith("block"):
        return depth - int(top[len("block"):])
    return depth + 1 if top in ("patch_embed", "cls_token", "pos_embedding") else 0


def test_layer_decay_scales_each_vit_block_and_composes_with_rules_and_schedule(vit_shapes):
    decay, lr_fn = 0.5, optim.make_schedule("constant", 0.1, 100, warmup_steps=4)
    rules = optim.parse_param_rules("head=lr:3;block1/mlp=lr:2")
    tx = optim.make_optimizer("sgd", lr_fn, momentum=0.0, param_rules=rules, layer_decay=decay, model_name="vit")
    _, updates = _run(tx, vit_shapes, n=3)
    names = ["/".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(vit_shapes,
             is_leaf=lambda x: isinstance(x, tuple))[0]]
    assert {_exponent(n) for n in names} == {0, 1, 2, 3, 4}
    for t, update in enumerate(updates):
        grads = jax.tree.leaves(_tree(vit_shapes, t + 1))
        for name, u, g in zip(names, jax.tree.leaves(update), grads):
            rule = 3.0 if name.startswith("head") else 2.0 if name.startswith("block1/mlp") else 1.0
            want = -float(lr_fn(t)) * rule * decay ** _exponent(name)
            np.testing.assert_allclose(np.asarray(u), want * np.asarray(g), rtol=1e-6, atol=1e-12, err_msg=name)


def test_layer_decay_on_a_model_without_blocks_is_one_line_naming_the_key_and_model():
    tx = optim.make_optimizer("adamw", _SCHED, layer_decay=0.75, model_name="cnn")
    with pytest.raises(fg.ConfigError) as err:
        tx.init(_tree(_SHAPES, 0))
    message = str(err.value)
    assert message.startswith("optimizer.layer_decay") and "'cnn'" in message and "\n" not in message


@pytest.mark.parametrize("override, key", [("optimizer.layer_decay=0.75", "optimizer.layer_decay"),
                                           ("optimizer.param_rules='blok=lr:2'", "optimizer.param_rules")])
def test_rules_the_model_cannot_use_fail_when_the_state_is_built(override, key):
    cfg = fg.build_config({}, [override])
    with pytest.raises(fg.ConfigError) as err:
        fg.build_state(cfg, abstract=True)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


# --- wiring and checkpoints --------------------------------------------------------------------------------

def test_build_optimizer_passes_every_key_through():
    cfg = fg.build_config({}, ["optimizer.name='lion'", "optimizer.b1=0.95", "optimizer.b2=0.9", "train.steps=4",
                               "optimizer.weight_decay=0.1", "optimizer.schedule='step'",
                               "optimizer.step_boundaries='0.5'", "optimizer.step_factor=0.2"])
    tx, lr_fn = fg.build_optimizer(cfg)
    schedule = optax.piecewise_constant_schedule(1e-3, {2: 0.2})
    assert _values(lr_fn, range(5)) == pytest.approx(_values(schedule, range(5)))
    reference = optax.lion(schedule, b1=0.95, b2=0.9, weight_decay=0.1, mask=_KERNELS)
    for a, b in zip(jax.tree.leaves(_run(tx, _SHAPES, 4)), jax.tree.leaves(_run(reference, _SHAPES, 4))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)


def test_a_state_with_rules_and_layer_decay_round_trips_through_a_checkpoint(tmp_path):
    """The per-group state (optax.multi_transform's, masked leaves included) is a plain optax state to Orbax."""
    from fastgpu_jax import checkpoint
    from fastgpu_jax.state import TrainState, with_shardings

    shapes = {"patch_embed": {"kernel": (2, 2), "bias": (2,)}, "block0": {"mlp": {"kernel": (2, 2), "bias": (2,)}},
              "block1": {"mlp": {"kernel": (2, 2), "bias": (2,)}}, "head": {"kernel": (2, 2), "bias": (2,)}}
    tx = optim.make_optimizer("lamb", _SCHED, weight_decay=0.05, layer_decay=0.8, model_name="vit",
                              param_rules=optim.parse_param_rules("head=lr:10,wd:0;bias=wd:0.2"))
    params = _tree(shapes, 0)
    opt_state = tx.init(params)
    update, opt_state = jax.jit(tx.update)(_tree(shapes, 1), opt_state, params)
    state = TrainState(step=jnp.asarray(1, jnp.int32), params=optax.apply_updates(params, update), batch_stats={},
                       opt_state=opt_state, rng=jax.random.PRNGKey(0), loss_scale=jnp.asarray(1.0),
                       good_steps=jnp.asarray(0, jnp.int32), apply_fn=None, tx=tx, lr_fn=_SCHED)
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state, {}, {})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = ckpt.restore_latest(with_shardings(target, jax.tree.map(lambda _: device, target)))[0]
    ckpt.close()
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- config errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key, words", [
    (["optimizer.schedule='step'"], "optimizer.step_boundaries", "required"),
    (["optimizer.schedule='step'", "optimizer.step_boundaries='0.75,0.5'"], "optimizer.step_boundaries", "increasing"),
    (["optimizer.schedule='step'", "optimizer.step_boundaries='0,0.5'"], "optimizer.step_boundaries", "(0, 1)"),
    (["optimizer.schedule='step'", "optimizer.step_boundaries='half'"], "optimizer.step_boundaries", "fractions"),
    (["optimizer.schedule='step'", "optimizer.step_boundaries='0.05'", "optimizer.warmup_steps=100"],
     "optimizer.step_boundaries", "warmup"),
    (["optimizer.step_boundaries='0.5'"], "optimizer.step_boundaries", "has no effect"),
    (["optimizer.step_factor=0.5"], "optimizer.step_factor", "has no effect"),
    (["optimizer.param_rules='head'"], "optimizer.param_rules", "regex=lr:MULT"),
    (["optimizer.param_rules='(head=lr:2'"], "optimizer.param_rules", "does not compile"),
    (["optimizer.param_rules='head=momentum:2'"], "optimizer.param_rules", "lr:MULT or wd:DECAY"),
    (["optimizer.param_rules='head=lr:2,lr:3'"], "optimizer.param_rules", "at most once"),
    (["optimizer.param_rules='head=lr:-1'"], "optimizer.param_rules", ">= 0"),
    (["optimizer.param_rules='head=wd:x'"], "optimizer.param_rules", ">= 0"),
    (["optimizer.param_rules='head='"], "optimizer.param_rules", "regex=lr:MULT"),
    (["optimizer.name='sgd'", "optimizer.b1=0.8"], "optimizer.b1", "has no effect"),
    (["optimizer.name='lars'", "optimizer.b2=0.8"], "optimizer.b2", "has no effect"),
    (["optimizer.name='lion'", "optimizer.eps=1e-6"], "optimizer.eps", "has no effect"),
    (["optimizer.name='lion'", "optimizer.momentum=0.5"], "optimizer.momentum", "has no effect"),
])
def test_config_mistakes_are_one_line_naming_the_key(overrides, key, words):
    with pytest.raises(fg.ConfigError) as err:
        fg.build_config({}, overrides)
    message = str(err.value)
    assert key in message.split("=")[0] and words in message and "\n" not in message, message


@pytest.mark.parametrize("overrides", [
    ["optimizer.name='lars'", "optimizer.momentum=0.5", "optimizer.nesterov=True"],
    ["optimizer.name='lion'", "optimizer.b1=0.95", "optimizer.b2=0.98"],
    ["optimizer.name='lamb'", "optimizer.eps=1e-6", "optimizer.b1=0.8"],
    ["optimizer.schedule='step'", "optimizer.step_boundaries='0.5, 0.75'", "optimizer.step_factor=0.5"],
    ["optimizer.schedule='one_cycle'", "optimizer.warmup_steps=100"],
    ["optimizer.param_rules='head=lr:10,wd:0; (bias|scale)$=wd:0'", "optimizer.layer_decay=0.65"],
])
def test_settings_where_the_keys_act_are_accepted(overrides):
    fg.build_config({}, overrides)
