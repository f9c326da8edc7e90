"""Config loading, overrides, validation and freezing."""

import ast
import os
import textwrap

import pytest

import fastgpu_jax as fg
from fastgpu_jax import config as C
from conftest import DIGITS, ROOT


def test_defaults_file_and_overrides_merge():
    cfg = fg.load_config(DIGITS, overrides=["optimizer.lr=3e-4", "--config.train.steps=70", "data.batch_size=32"])
    assert cfg.optimizer.lr == 3e-4 and cfg.train.steps == 70 and cfg.data.batch_size == 32
    assert cfg.data.name == "digits"  # from the file
    assert cfg.train.precision == C.SCHEMA["train.precision"].default  # from the defaults


def test_file_arg_selects_variant():
    assert fg.load_config(DIGITS + ":quick").train.steps < fg.load_config(DIGITS).train.steps


def test_config_is_frozen():
    cfg = fg.load_config(DIGITS)
    with pytest.raises((AttributeError, TypeError, ValueError)):
        cfg.train.steps = 3


def test_int_is_accepted_for_float_and_kept_float():
    cfg = fg.build_config({"optimizer": {"lr": 1}})
    assert isinstance(cfg.optimizer.lr, float) and cfg.optimizer.lr == 1.0


@pytest.mark.parametrize("overrides, words", [
    (["optimizer.lrr=1"], ["optimizer.lrr", "optimizer.lr"]),
    (["trian.steps=1"], ["trian.steps"]),
    (["train.steps=abc"], ["train.steps", "int"]),
    (["train.steps=1.5"], ["train.steps", "int"]),
    (["data.augment=3"], ["data.augment", "bool"]),
    (["train.steps=0"], ["train.steps", "> 0"]),
    (["optimizer.lr=-1"], ["optimizer.lr"]),
    (["optimizer.name=rmsprop"], ["optimizer.name", "sgd", "adamw"]),
    (["model.name=vgg"], ["model.name", "resnet50"]),
    (["train.precision=float64"], ["train.precision", "bfloat16"]),
    (["model.backend=cuda"], ["model.backend", "pallas"]),
    (["data.batch_size=10", "train.grad_accum_steps=3"], ["data.batch_size=10", "grad_accum_steps=3"]),
    (["model.dropout_rate=1.0"], ["model.dropout_rate"]),
    # Keys the chosen model or data set would ignore (the digits config sets model.width=32):
    (["model.name=vit_s4"], ["model.width=32", "vit_s4", "variant"]),
    (["model.name=vit_s4", "model.width=0", "model.stem=cifar"], ["model.stem='cifar'", "vit_s4", "patch"]),
    (["model.stem=cifar"], ["model.stem", "'cnn'", "ResNet"]),
    (["data.augment=True"], ["data.augment=True", "'digits'", "cifar10"]),
    (["data.image_size=16"], ["data.image_size=16", "'digits'", "8x8x1", "synthetic"]),
    (["parallel.mesh=data=1,model=2"], ["parallel.mesh='data=1,model=2'", "model axis"]),
    (["noequals"], ["key=value"]),
])
def test_bad_values_fail_with_one_line_naming_the_key(overrides, words):
    with pytest.raises(C.ConfigError) as err:
        fg.load_config(DIGITS, overrides=overrides)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_keys_that_act_are_accepted():
    assert fg.load_config(DIGITS, overrides=["model.name=resnet18", "model.stem=cifar"]).model.dropout_rate == 0.1
    assert fg.load_config(DIGITS, overrides=["model.name=vit_s4", "model.width=0"]).model.dropout_rate == 0.1
    assert fg.build_config({"data": {"name": "cifar10", "augment": True}}).data.augment
    assert fg.build_config({"data": {"name": "synthetic", "image_size": 16}}).data.image_size == 16
    assert fg.build_config({"parallel": {"mesh": "data=1,model=1"}}).parallel.mesh == "data=1,model=1"


def test_a_saved_config_with_keys_that_had_no_effect_still_loads():
    """config.json written before those keys were refused: they never acted, so they go back to defaults."""
    flat = dict(C.to_flat_dict(fg.load_config(DIGITS)), **{"model.name": "vit_s4", "data.augment": True})
    cfg = C.from_flat_dict(flat)
    assert (cfg.model.width, cfg.data.augment, cfg.model.dropout_rate) == (0, False, 0.1)


def test_missing_data_dir_is_refused_when_the_data_is_needed():
    """Not at load time (``bench`` times such a config on stand-in data), but before anything reads data."""
    from fastgpu_jax.builders import dataset_info

    cfg = fg.load_config(DIGITS, overrides=["data.name=mnist"])
    with pytest.raises(C.ConfigError) as err:
        dataset_info(cfg)
    assert "data.dir" in str(err.value) and "mnist" in str(err.value) and "\n" not in str(err.value)


LINEAR_CONFIG = '''
    """A linear classifier on digits, registered by this file. Run:
        fastgpu-jax train --config linear.py --workdir runs/linear"""
    import flax.linen as nn
    import ml_collections

    from fastgpu_jax import models
    from fastgpu_jax.nn import Dense


    class Linear(nn.Module):
        num_classes: int
        dropout_rate: float = 0.0

        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x.reshape((x.shape[0], -1)))
            return Dense(self.num_classes)(x)


    models.register("test_linear", lambda num_classes, width, dropout_rate, stem, dtype, bn_axis_name=None:
                    Linear(num_classes, dropout_rate), accepts=("dropout_rate",))


    def get_config():
        c = ml_collections.ConfigDict()
        c.model = dict(name="test_linear", dropout_rate=0.1)
        c.optimizer = dict(lr=0.01)
        c.train = dict(steps=20, log_every_steps=10, checkpoint_every_steps=20)
        c.log = dict(tensorboard=False, progress_bar=False)
        return c
'''


def test_a_model_registered_in_a_config_file_trains(tmp_path, monkeypatch):
    from fastgpu_jax import models

    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # the registration ends with this test
    monkeypatch.setattr(models, "_KEYS", dict(models._KEYS))
    path = tmp_path / "linear.py"
    path.write_text(textwrap.dedent(LINEAR_CONFIG))
    summary = fg.train(fg.load_config(str(path)), workdir=str(tmp_path / "run"))
    assert summary["step"] == 20 and summary["val"]["accuracy"] > 0.5, summary  # chance: 0.1
    assert "test_linear" in C.MODEL_NAMES
    with pytest.raises(C.ConfigError) as err:  # it did not declare width
        fg.load_config(str(path), overrides=["model.width=8"])
    message = str(err.value)
    assert "model.width=8" in message and "test_linear" in message and "accepts=" in message
    assert "\n" not in message


def test_bad_files(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        fg.load_config(str(tmp_path / "nope.py"))
    f = tmp_path / "noget.py"
    f.write_text("x = 1\n")
    with pytest.raises(C.ConfigError, match="get_config"):
        fg.load_config(str(f))
    f = tmp_path / "unknown.py"
    f.write_text(textwrap.dedent("""
        import ml_collections
        def get_config():
            c = ml_collections.ConfigDict()
            c.model = dict(nmae="cnn")
            return c
    """))
    with pytest.raises(C.ConfigError, match="model.nmae"):
        fg.load_config(str(f))


def test_override_parsing():
    assert C.parse_override("a.b=true") == ("a.b", True)
    assert C.parse_override("optimizer.lr=1e-3") == ("optimizer.lr", 1e-3)
    assert C.parse_override("optimizer.lr=1") == ("optimizer.lr", 1.0)
    assert C.parse_override("data.dir=/some/where") == ("data.dir", "/some/where")
    assert C.parse_override("data.dir=None") == ("data.dir", None)
    assert C.parse_override("parallel.strategy=none") == ("parallel.strategy", "none")
    assert C.parse_override("data.name=123") == ("data.name", "123")  # str keys stay strings


def test_flat_round_trip_and_changed_keys():
    cfg = fg.load_config(DIGITS)
    flat = C.to_flat_dict(cfg)
    assert C.to_flat_dict(C.from_flat_dict(flat)) == flat
    other = dict(flat, **{"train.log_every_steps": 3, "optimizer.lr": 9.0})
    assert C.changed_keys(flat, other) == ["optimizer.lr"]  # logging cadence may change on resume
    longer = dict(flat, **{"train.steps": flat["train.steps"] + 1})
    assert C.changed_keys(flat, longer) == ["train.steps"]  # the cosine schedule spans train.steps


CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_file_loads_and_documents_its_run(name):
    path = os.path.join(ROOT, "configs", name)
    overrides = ["data.dir=/data"] if name.startswith(("mnist", "cifar")) else []
    cfg = fg.load_config(path, overrides=overrides)
    assert cfg.model.name in C.MODEL_NAMES
    doc = ast.get_docstring(ast.parse(open(path).read()))
    assert doc and "fastgpu-jax train --config configs/" + name in doc


def test_features_of_later_versions_are_refused_clearly():
    for override, key in (("train.profile_steps=5", "train.profile_steps"), ("parallel.strategy=tp", "parallel.strategy")):
        with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
            fg.load_config(DIGITS, overrides=[override])


@pytest.mark.parametrize("override, suggestion", [
    ("optimizer.learning_rate=0.1", "did you mean 'optimizer.lr'?"),  # another library's name for it
    ("train.setps=3", "did you mean 'train.steps'?"),  # a typo
    ("data.batch=3", "did you mean 'data.batch_size'?"),
    ("model.name='resnet5'", "did you mean 'resnet50'?"),  # a near-miss value
    ("optimizer.name='adamm'", "did you mean 'adam'?"),
])
def test_near_misses_get_a_suggestion(override, suggestion):
    with pytest.raises(fg.ConfigError) as err:
        fg.load_config(DIGITS, [override])
    assert suggestion in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, key", [
    (["optimizer.momentum=0.5"], "optimizer.momentum"),  # adam has no momentum
    (["optimizer.name='adamw'", "optimizer.nesterov=True"], "optimizer.nesterov"),
    (["train.loss_scale_init=4.0"], "train.loss_scale_init"),  # float32: no loss scaling
    (["train.loss_scale_period=10"], "train.loss_scale_period"),
])
def test_optimizer_and_precision_keys_that_would_not_act_are_refused(overrides, key):
    with pytest.raises(fg.ConfigError) as err:
        fg.load_config(DIGITS, overrides)
    assert str(err.value).startswith(key) and "has no effect" in str(err.value) and "\n" not in str(err.value)
    acting = {"optimizer.momentum": ["optimizer.name='sgd'"], "optimizer.nesterov": ["optimizer.name='sgd'"],
              "train.loss_scale_init": ["train.precision='float16'"],
              "train.loss_scale_period": ["train.precision='float16'"]}[key]
    fg.load_config(DIGITS, [o for o in overrides if "optimizer.name" not in o] + acting)  # where it acts: fine


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_data_dir_for_a_set_that_reads_no_files_is_refused(name, tmp_path):
    with pytest.raises(fg.ConfigError) as err:
        fg.load_config(DIGITS, [f"data.name='{name}'", f"data.dir='{tmp_path}'"])
    message = str(err.value)
    assert message.startswith("data.dir") and name in message and "mnist" in message and "\n" not in message
    fg.load_config(DIGITS, ["data.name='mnist'", f"data.dir='{tmp_path}'"])  # where it is read: fine
