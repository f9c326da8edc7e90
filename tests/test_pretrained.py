"""fastgpu_jax.pretrained against torch itself: the fixtures (tests/fixtures/pretrained, written by its
make_fixtures.py in a throwaway torch virtualenv) hold small torchvision-code ResNets (BasicBlock, Bottleneck)
and a timm ViT with random weights, as .safetensors and .pth, and torch's own eval-mode logits; CI needs no torch.

Fixture sizes: 0.88 MB of data in all, the largest file (vit.pth) 0.2 MB. Also checked here: timm's
position-embedding resampling, the restricted unpickler (a pickled callable is refused and never runs), tensor
views and dtypes in a .pth, architecture and shape mismatches, head re-initialisation, the name/shape coverage of
the full-size torchvision resnet18/34/50 and timm vit_{tiny,small,base}_patch16_224 state dicts (shapes only), and
our own trees from a run's workdir and from an exported .msgpack.
"""

import collections
import functools
import json
import os
import pickle
import zipfile

import flax.core
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastgpu_jax as fg
from fastgpu_jax import models, pretrained
from fastgpu_jax.errors import UserError
from fastgpu_jax.models.resnet import BasicBlock, BottleneckBlock, ResNet
from fastgpu_jax.models.vit import ViT
from fastgpu_jax.pretrained import PretrainedError, UnsafePickleError, load_init, plan_init

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "pretrained")
KEY = jax.random.key(0, impl="rbg")
TOL = 1e-4  # max |ours - torch| / max |torch|, float32
RESNETS = {"resnet_basic": BasicBlock, "resnet_bottleneck": BottleneckBlock}
VIT = dict(patch=8, width=48, depth=2, num_heads=3, mlp_dim=96)  # timm VisionTransformer(embed_dim=48, ...)


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
        return dict(f)


def _fixture(name):
    return os.path.join(FIXTURES, name)


def _rel_err(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


_MODELS = {}


def _model(kind, num_classes=5, size=33, block=None):
    """(model, fresh variables, jitted apply), built once per configuration."""
    key = (kind, num_classes, size, block)
    if key not in _MODELS:
        if kind == "resnet":
            model = ResNet(stage_sizes=(1, 1, 1, 1), block=block, width=4, num_classes=num_classes)
        else:
            model = ViT(num_classes=num_classes, **VIT)
        _MODELS[key] = model, _fresh(model, size), jax.jit(lambda v, x: model.apply(v, x))
    return _MODELS[key]


def _fresh(model, size, channels=3):
    """Stand-in fresh variables: random values of the init's shapes (no init is compiled: that is seconds)."""
    abstract = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)


def _load(path, variables, **kwargs):
    return load_init(path, variables["params"], variables.get("batch_stats", {}), **kwargs)


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


# --- logits against torch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
@pytest.mark.parametrize("name", RESNETS)
def test_resnet_logits_match_torchvision(ref, name, suffix):
    """33x33 inputs: every stride-2 3x3 conv sees an odd size, where flax's SAME padding equals torch's 1
    (see the even-size test below)."""
    _, variables, apply = _model("resnet", block=RESNETS[name])
    params, batch_stats, report = _load(_fixture(f"{name}.{suffix}"), variables, model_name=name)
    assert _rel_err(apply({"params": params, "batch_stats": batch_stats}, ref["resnet_x33"]),
                    ref[f"{name}_logits33"]) <= TOL
    n_targets = len(jax.tree.leaves(variables))
    assert len(report.loaded) == n_targets and not report.kept_init and not report.unmatched_source
    assert report.skipped and all(s.endswith("num_batches_tracked") for s in report.skipped)
    assert report.family == "resnet" and not report.shape_mismatches
    assert f"{n_targets} tensors loaded" in report.summary()
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves((params, batch_stats)))


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_logits_match_torchvision_at_even_sizes(ref, name):
    _, variables, apply = _model("resnet", block=RESNETS[name], size=32)
    params, batch_stats, _ = _load(_fixture(f"{name}.pth"), variables, model_name=name)
    assert _rel_err(apply({"params": params, "batch_stats": batch_stats}, ref["resnet_x32"]),
                    ref[f"{name}_logits32"]) <= TOL


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_vit_logits_match_timm(ref, suffix):
    _, variables, apply = _model("vit", size=32)
    params, batch_stats, report = _load(_fixture(f"vit.{suffix}"), variables, model_name="vit_tiny")
    assert batch_stats == {}
    assert _rel_err(apply({"params": params}, ref["vit_x32"]), ref["vit_logits32"]) <= TOL
    assert len(report.loaded) == len(jax.tree.leaves(variables)) and not report.kept_init
    assert report.family == "vit" and not report.skipped and not report.resized


def test_pos_embedding_resize_matches_timm(ref):
    """Up (4x4 -> 6x6) and down (4x4 -> 3x3) against timm's resample_abs_pos_embed, then a whole 48x48 model
    against timm's model built for 48x48 from the same checkpoint (timm's checkpoint filter resamples)."""
    pos = dict(pretrained.read_source(_fixture("vit.safetensors"))[0])["pos_embed"].astype(np.float32)
    for grid in (6, 3):
        resized = pretrained.resize_pos_embedding(pos, (grid, grid))
        assert resized.shape == (1, 1 + grid * grid, 48)
        np.testing.assert_array_equal(resized[:, 0], pos[:, 0])  # the class-token row is kept as it is
        assert _rel_err(resized, ref[f"vit_pos_{grid}x{grid}"]) <= 1e-5
    _, variables, apply = _model("vit", size=48)
    params, _, report = _load(_fixture("vit.pth"), variables, model_name="vit")
    assert report.resized == [("params/pos_embedding", (1, 17, 48), (1, 37, 48))]
    assert report.shape_mismatches == report.resized and "resized params/pos_embedding" in report.summary()
    assert _rel_err(apply({"params": params}, ref["vit_x48"]), ref["vit_logits48"]) <= TOL


def test_pos_embedding_resize_to_a_non_square_grid():
    _, variables, _ = _model("vit", size=32)
    params = {**variables["params"], "pos_embedding": jnp.zeros((1, 1 + 2 * 6, 48))}  # a 16x48 input
    with pytest.raises(PretrainedError, match="image_shape") as e:
        load_init(_fixture("vit.pth"), params, {}, model_name="vit")
    _one_line(e)
    out, _, report = load_init(_fixture("vit.pth"), params, {}, model_name="vit", image_shape=(16, 48, 3))
    assert out["pos_embedding"].shape == (1, 13, 48) and report.resized[0][2] == (1, 13, 48)


def test_head_is_reinitialised_for_another_class_count():
    _, fresh, _ = _model("resnet", num_classes=7, block=BasicBlock)
    params, batch_stats, report = _load(_fixture("resnet_basic.safetensors"), fresh, model_name="resnet_basic")
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, fresh["params"])
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(params["head"][leaf], fresh["params"]["head"][leaf])
    assert sorted(report.kept_init) == ["params/head/bias", "params/head/kernel"]
    assert sorted(report.reinitialised) == [("params/head/bias", (5,), (7,)),
                                            ("params/head/kernel", (5, 32), (32, 7))]
    assert "head re-initialised" in report.summary()
    assert len(report.loaded) == len(jax.tree.leaves(fresh)) - 2
    # the body is the pretrained one: equal to the 5-class model's, whose logits match torch's (above)
    body5, stats5, _ = _load(_fixture("resnet_basic.safetensors"), _model("resnet", block=BasicBlock)[1],
                             model_name="resnet_basic")
    params.pop("head"), body5.pop("head")
    for x, y in zip(jax.tree.leaves((params, batch_stats)), jax.tree.leaves((body5, stats5)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_frozen_in_frozen_out_and_deterministic():
    _, variables, _ = _model("resnet", block=BottleneckBlock)
    frozen = flax.core.freeze(variables)
    a = load_init(_fixture("resnet_bottleneck.pth"), frozen["params"], frozen["batch_stats"], model_name="r")
    b = _load(_fixture("resnet_bottleneck.safetensors"), variables, model_name="r")
    assert isinstance(a[0], flax.core.FrozenDict) and isinstance(a[1], flax.core.FrozenDict)
    assert type(b[0]) is dict and type(b[1]) is dict
    again = load_init(_fixture("resnet_bottleneck.pth"), frozen["params"], frozen["batch_stats"], model_name="r")
    for x, y, z in zip(jax.tree.leaves(a[:2]), jax.tree.leaves(b[:2]), jax.tree.leaves(again[:2]), strict=True):
        np.testing.assert_array_equal(x, y)  # the .pth's float32 values are the .safetensors' float16 ones
        np.testing.assert_array_equal(x, z)
    assert a[2] == again[2]


# --- the .pth reader ------------------------------------------------------------------------------------------


def test_pth_reader_honours_views_offsets_and_dtypes(ref):
    tensors, _ = pretrained.read_source(_fixture("views.pth"))
    assert set(tensors) == {k[len("views_"):] for k in ref if k.startswith("views_")}
    for name, value in tensors.items():
        assert value.shape == ref[f"views_{name}"].shape, name
        np.testing.assert_array_equal(np.asarray(value, np.float32), ref[f"views_{name}"])
    assert tensors["half"].dtype == np.float16 and tensors["int64"].dtype == np.int64
    assert str(tensors["bfloat16"].dtype) == "bfloat16"


def _torch_zip(path, pickled: bytes):
    """A torch.save-style archive around ``pickled`` (no storages needed for these tests)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return str(path)


class _Shell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __reduce__(self):
        return eval, ("__import__('os').system('exit 3')",)


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_pickled_callable_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "ran"
    evil = _Shell(f"touch {marker}") if payload == "os.system" else _Eval()
    state = collections.OrderedDict(weight=evil)  # hidden inside an ordinary-looking state dict
    path = _torch_zip(tmp_path / "evil.pth", pickle.dumps(state, protocol=2))
    refused = r"refused to unpickle the global (posix|os|nt|builtins|__builtin__)\."
    with pytest.raises(UnsafePickleError, match=refused) as e:
        load_init(path, {}, {}, model_name="resnet18")
    assert "evil.pth" in _one_line(e) and isinstance(e.value, UserError)
    assert not marker.exists()


def test_torch_file_errors_are_one_line(tmp_path):
    not_zip = tmp_path / "legacy.pth"
    not_zip.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(PretrainedError, match="not a torch.save zip archive") as e:
        pretrained.read_source(str(not_zip))
    _one_line(e)
    no_tensors = _torch_zip(tmp_path / "epoch.pth", pickle.dumps({"epoch": 3, "arch": "resnet18"}, protocol=2))
    with pytest.raises(PretrainedError, match=r"holds no state dict.*epoch, arch") as e:
        pretrained.read_source(no_tensors)
    _one_line(e)
    with pytest.raises(FileNotFoundError, match="nope.pth not found"):
        pretrained.read_source(str(tmp_path / "nope.pth"))
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(PretrainedError, match=r"unknown kind of weights file \.npz"):
        pretrained.read_source(str(tmp_path / "w.npz"))


def test_safetensors_module_prefix_is_dropped(tmp_path):
    import safetensors.numpy

    tensors, _ = pretrained.read_source(_fixture("vit.safetensors"))
    path = str(tmp_path / "ddp.safetensors")
    safetensors.numpy.save_file({"module." + k: v for k, v in tensors.items()}, path)
    _, variables, _ = _model("vit", size=32)
    direct, _, _ = _load(_fixture("vit.safetensors"), variables, model_name="vit")
    prefixed, _, report = _load(path, variables, model_name="vit")
    assert len(report.loaded) == len(jax.tree.leaves(variables))
    for x, y in zip(jax.tree.leaves(direct), jax.tree.leaves(prefixed)):
        np.testing.assert_array_equal(x, y)


# --- mismatches -----------------------------------------------------------------------------------------------


def test_wrong_architecture_is_one_clear_line():
    _, bottleneck, _ = _model("resnet", block=BottleneckBlock)
    with pytest.raises(PretrainedError, match=r"BasicBlock blocks, \(1, 1, 1, 1\).*'resnet_bottleneck'.*"
                                              r"Bottleneck blocks") as e:
        _load(_fixture("resnet_basic.pth"), bottleneck, model_name="resnet_bottleneck")
    _one_line(e)
    _, vit, _ = _model("vit", size=32)
    with pytest.raises(PretrainedError, match="ResNet state dict cannot initialise model 'vit_ti16'.*a ViT") as e:
        _load(_fixture("resnet_basic.safetensors"), vit, model_name="vit_ti16")
    _one_line(e)
    shallow = jax.eval_shape(ViT(num_classes=5, **{**VIT, "depth": 1}).init, KEY, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(PretrainedError, match="ViT weights have 2 blocks, model 'vit1' has 1"):
        plan_init(_shapes("vit.safetensors"), shallow["params"], {}, model_name="vit1")


def test_wrong_shape_names_the_tensor_and_both_shapes():
    wide = jax.eval_shape(ResNet(stage_sizes=(1, 1, 1, 1), block=BasicBlock, width=8, num_classes=5).init, KEY,
                          jnp.zeros((1, 33, 33, 3)))
    with pytest.raises(PretrainedError, match=r"tensor conv1\.weight has shape \(4, 3, 7, 7\) \(\(7, 7, 3, 4\) "
                                              r"after OIHW -> HWIO\), but model 'r8' has params/stem_conv/kernel "
                                              r"of shape \(7, 7, 3, 8\)") as e:
        plan_init(_shapes("resnet_basic.pth"), wide["params"], wide["batch_stats"], model_name="r8")
    _one_line(e)
    cifar = jax.eval_shape(ResNet(stage_sizes=(1, 1, 1, 1), block=BasicBlock, width=4, stem="cifar").init, KEY,
                           jnp.zeros((1, 33, 33, 3)))
    with pytest.raises(PretrainedError, match=r"conv1\.weight .*stem_conv/kernel of shape \(3, 3, 3, 4\)"):
        plan_init(_shapes("resnet_basic.pth"), cifar["params"], cifar["batch_stats"], model_name="cifar")


def _shapes(name):
    return {k: v.shape for k, v in pretrained.read_source(_fixture(name))[0].items()}


def test_strict_refuses_leftovers_and_non_strict_reports_them():
    _, variables, _ = _model("vit", size=32)
    params = variables["params"]
    extra = {**_shapes("vit.safetensors"), "fc_norm.weight": (48,)}  # a timm ViT with global-average pooling
    with pytest.raises(PretrainedError, match=r"1 tensor\(s\) have no place in model 'v', first fc_norm\.weight"):
        plan_init(extra, params, {}, model_name="v")
    _, report = plan_init(extra, params, {}, model_name="v", strict=False)
    assert report.unmatched_source == ["fc_norm.weight"] and "1 source tensors unused" in report.summary()
    missing = {k: v for k, v in _shapes("vit.safetensors").items() if k != "norm.weight"}
    with pytest.raises(PretrainedError, match="no tensor for 1 of model 'v'.*params/ln_final/scale"):
        plan_init(missing, params, {}, model_name="v")
    _, report = plan_init(missing, params, {}, model_name="v", strict=False)
    assert report.kept_init == ["params/ln_final/scale"]
    headless = {k: v for k, v in _shapes("vit.safetensors").items() if not k.startswith("head.")}
    _, report = plan_init(headless, params, {}, model_name="v")  # a features-only checkpoint: head kept
    assert sorted(report.kept_init) == ["params/head/bias", "params/head/kernel"]


# --- full-size architectures (names and shapes only) ---------------------------------------------------------

FULL = {"torchvision_resnet18": ("resnet18", 224), "torchvision_resnet34": ("resnet34", 224),
        "torchvision_resnet50": ("resnet50", 224), "timm_vit_tiny_patch16_224": ("vit_ti16", 224),
        "timm_vit_small_patch16_224": ("vit_s16", 224), "timm_vit_base_patch16_224": ("vit_b16", 224)}


@pytest.fixture(scope="module")
def full_keys():
    with open(_fixture("full_size_keys.json")) as f:
        return {name: {k: tuple(s) for k, s in keys.items()} for name, keys in json.load(f).items()}


@functools.lru_cache(maxsize=None)
def _abstract(model_name, size=224, num_classes=1000):
    """The full-size model's abstract (params, batch_stats): shapes only, traced once per configuration."""
    model = models.build(model_name, num_classes=num_classes)
    v = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return v["params"], v.get("batch_stats", {})


@pytest.mark.parametrize("source", FULL)
def test_mapping_covers_every_tensor_of_the_real_architectures(full_keys, source):
    model_name, size = FULL[source]
    params, batch_stats = _abstract(model_name, size)
    moves, report = plan_init(full_keys[source], params, batch_stats, model_name=model_name, source=source)
    n_targets = len(jax.tree.leaves((params, batch_stats)))
    assert len(moves) == len(report.loaded) == n_targets
    assert not report.kept_init and not report.unmatched_source and not report.shape_mismatches
    assert len(report.skipped) + n_targets == len(full_keys[source])  # num_batches_tracked only
    assert len({m.source for m in moves.values()}) == n_targets  # one source tensor per model tensor


def test_real_architecture_mismatches(full_keys):
    params, batch_stats = _abstract("resnet50")
    with pytest.raises(PretrainedError, match=r"ResNet-18 \(BasicBlock blocks, \(2, 2, 2, 2\) per stage\) do not "
                                              r"fit model 'resnet50', ResNet-50 \(Bottleneck"):
        plan_init(full_keys["torchvision_resnet18"], params, batch_stats, model_name="resnet50")
    params, _ = _abstract("resnet34")
    with pytest.raises(PretrainedError, match=r"ResNet-18 .* do not fit model 'resnet34', ResNet-34"):
        plan_init(full_keys["torchvision_resnet18"], params, {}, model_name="resnet34")
    params, _ = _abstract("vit_s16")
    with pytest.raises(PretrainedError, match=r"width 192 \(patch_embed\.proj\.weight \(192, 3, 16, 16\)\), "
                                              r"model 'vit_s16' has 384 \(params/patch_embed/kernel "
                                              r"\(16, 16, 3, 384\)\)"):
        plan_init(full_keys["timm_vit_tiny_patch16_224"], params, {}, model_name="vit_s16")
    params, _ = _abstract("vit_b16", size=384, num_classes=10)  # fine-tuning at 384 on 10 classes
    _, report = plan_init(full_keys["timm_vit_base_patch16_224"], params, {}, model_name="vit_b16")
    assert report.resized == [("params/pos_embedding", (1, 197, 768), (1, 577, 768))]
    assert sorted(p for p, _, _ in report.reinitialised) == ["params/head/bias", "params/head/kernel"]


# --- our own trees --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 2-step digits run and its export: (workdir, export path, the checkpoint's params). The MLP compiles in
    two thirds of the CNN's time; which layers the tree holds does not matter to a path-by-path match."""
    from conftest import DIGITS

    workdir = tmp_path_factory.mktemp("pretrained_digits")
    cfg = fg.load_config(DIGITS + ":quick", overrides=[
        "model.name=mlp", "model.width=16", "train.steps=2", "train.checkpoint_every_steps=2",
        "train.eval_every_steps=2", "train.log_every_steps=2", "optimizer.warmup_steps=0", "log.tensorboard=False",
        "log.progress_bar=False"])
    fg.train(cfg, str(workdir))
    export = str(workdir / "model.msgpack")
    fg.export_params(str(workdir), export)
    _, state, _ = fg.restore_state(str(workdir))
    return str(workdir), export, jax.device_get(state.params)


def _digits_init(num_classes=10, width=16, name="mlp"):
    return _fresh(models.build(name, num_classes=num_classes, width=width), 8, channels=1)["params"]


@pytest.mark.parametrize("kind", ["workdir", "export"])
def test_own_run_round_trips(digits_run, kind):
    workdir, export, trained = digits_run
    fresh = _digits_init()
    params, batch_stats, report = load_init(workdir if kind == "workdir" else export, fresh, {}, model_name="mlp")
    assert batch_stats == {} and report.family == "ours" and not report.kept_init
    assert len(report.loaded) == len(jax.tree.leaves(trained))
    assert jax.tree.structure(params) == jax.tree.structure(trained)
    for x, y, z in zip(jax.tree.leaves(params), jax.tree.leaves(trained), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)
    assert ("run of mlp, step 2" if kind == "workdir" else "export of mlp, step 2") in report.summary()


def test_own_run_into_other_heads_widths_and_models(digits_run):
    _, export, trained = digits_run
    params, _, report = load_init(export, _digits_init(num_classes=12), {}, model_name="mlp")
    assert params["head"]["kernel"].shape == (16, 12)
    np.testing.assert_array_equal(params["hidden1"]["kernel"], trained["hidden1"]["kernel"])
    assert sorted(p for p, _, _ in report.reinitialised) == ["params/head/bias", "params/head/kernel"]
    with pytest.raises(PretrainedError, match=r"tensor params/hidden0/bias has shape \(16,\), but model 'mlp' "
                                              r"has params/hidden0/bias of shape \(8,\)") as e:
        load_init(export, _digits_init(width=8), {}, model_name="mlp")
    _one_line(e)
    with pytest.raises(PretrainedError, match="have no place in model 'cnn'"):
        load_init(export, _digits_init(name="cnn", width=4), {}, model_name="cnn")
    with pytest.raises(PretrainedError, match="not a run's workdir"):
        load_init(os.path.dirname(export) + "/checkpoints", _digits_init(), {}, model_name="mlp")
