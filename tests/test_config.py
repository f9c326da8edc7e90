"""Config loading, overrides, validation and freezing."""

import ast
import os
import textwrap

import pytest

import fastgpu_jax as fg
from fastgpu_jax import config as C
from conftest import DIGITS, ROOT


def test_defaults_file_and_overrides_merge():
    cfg = fg.load_config(DIGITS, overrides=["optimizer.lr=3e-4", "--config.train.steps=70", "data.dir=/x"])
    assert cfg.optimizer.lr == 3e-4 and cfg.train.steps == 70 and cfg.data.dir == "/x"
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
    (["data.name=mnist"], ["data.dir"]),
    (["model.dropout_rate=1.0"], ["model.dropout_rate"]),
    (["noequals"], ["key=value"]),
])
def test_bad_values_fail_with_one_line_naming_the_key(overrides, words):
    with pytest.raises(C.ConfigError) as err:
        fg.load_config(DIGITS, overrides=overrides)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


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
