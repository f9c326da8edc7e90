"""Start a model from pretrained weights: a run of ours, or a torchvision/timm ResNet or timm ViT state dict,
read without torch.

    params, batch_stats, report = load_init(path, params, batch_stats, model_name="resnet50")
    print(report.summary())

``params``/``batch_stats`` are the model's freshly initialised trees; every tensor the source has for them is
replaced by the source's value (float32), everything else keeps its init, and the report says which is which.
Nothing is printed; the result depends only on the inputs.

Sources (``path``):

- a run's workdir (``config.json`` + ``checkpoints/``): its newest checkpoint (``evaluate.restore_state``), or an
  exported ``.msgpack`` (``inference.export_params``). These are our own trees: matched path by path.
- a PyTorch state dict of a torchvision or timm ResNet-18/34/50 (the two name their tensors alike) or of a timm
  ViT, as ``.safetensors`` (``safetensors.numpy``) or ``.pth``/``.pt``/``.bin`` (torch.save's zip format). The
  pickle inside a .pth is read by a restricted unpickler that resolves only the globals a state dict needs
  (OrderedDict, torch's tensor/parameter rebuild functions, the storage types) to functions of this module;
  any other global is refused before anything is built, so pickled code never runs. A few data-only globals of
  training checkpoints (``argparse.Namespace``, numpy scalars) become inert placeholders. A checkpoint dict
  holding the state dict under "state_dict" or "model" is unwrapped and a DDP "module." prefix dropped.

Layouts: conv OIHW -> HWIO; linear (out, in) -> (in, out); BatchNorm weight/bias -> params scale/bias,
running_mean/running_var -> batch_stats mean/var (num_batches_tracked is skipped); LayerNorm weight -> scale.
ResNet names: conv1/bn1 -> stem_conv/stem_bn, layer{i}.{j}.conv{k}/bn{k} -> stage{i-1}_block{j}/Conv_{k-1}/
BatchNorm_{k-1}, layer{i}.{j}.downsample.0/1 -> proj_conv/proj_bn, fc -> head. ViT names: patch_embed.proj ->
patch_embed, cls_token -> cls_token, pos_embed -> pos_embedding, blocks.{n}.norm1/norm2 -> block{n}/ln1/ln2,
attn.qkv -> attn/qkv (timm splits the 3D outputs as (3, heads, head_dim), as our model does, so the fused
kernel is just transposed), attn.proj -> attn/out, mlp.fc1/fc2 -> mlp/fc1/fc2, norm -> ln_final, head -> head.
A ViT state dict does not record its head count: the source must have the model's num_heads (timm's
vit_{tiny,small,base}_patch16 have 3, 6, 12, as our Ti, S, B).

Shapes: the head is kept at its init (and reported) when its shape differs (another class count). The
position embedding is resized when the token count differs: the class-token row is kept and the grid part is
resampled with ``jax.image.resize(method="cubic", antialias=True)``, which is what timm's
``resample_abs_pos_embed`` does (torch's bicubic with antialias: the Keys kernel with a = -0.5, scaled when
shrinking, weights renormalised at the borders; the tests check both directions against timm). Any other shape
difference, and any architecture difference (block type, blocks per stage, depth, a tensor one side lacks), is a
one-line ``PretrainedError`` naming the tensor and both shapes. ``strict=False`` loads what matches and reports
the rest instead of refusing tensors that one side lacks (shape differences stay errors).

Agreement with torch (tests/test_pretrained.py, float32): logits within 1e-4 relative (measured: ~2e-7) for ViT
and ResNet (BasicBlock and Bottleneck) at even and odd input sizes; our ResNet pads its 3x3 convs (1, 1) as
torchvision does.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pickle
import re
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

from fastgpu_jax.errors import UserError

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_HEAD = "params/head/"
_POS = "params/pos_embedding"
_POS_KIND = {_POS: "resize"}  # our own trees: how a same-named tensor converts (copy unless named here)
_SKIP = "skip"  # a source tensor that carries no weight (BatchNorm's num_batches_tracked)
_FAMILIES = {"ours": "fastgpu_jax params", "resnet": "torchvision/timm ResNet state dict",
             "vit": "timm ViT state dict"}
_RESNETS = {((2, 2, 2, 2), False): "ResNet-18", ((3, 4, 6, 3), False): "ResNet-34", ((3, 4, 6, 3), True): "ResNet-50",
            ((3, 4, 23, 3), True): "ResNet-101", ((3, 8, 36, 3), True): "ResNet-152"}


class PretrainedError(UserError):
    """The source cannot initialise this model as it is: the message names the file, tensor and shapes."""


class UnsafePickleError(PretrainedError):
    """A .pth asks for a global that a plain state dict never needs; nothing from the file was run."""


@dataclasses.dataclass
class InitReport:
    """What ``load_init`` did, tensor by tensor (paths like ``params/stem_conv/kernel``)."""

    source: str
    family: str  # "ours" | "resnet" | "vit"
    model_name: str
    loaded: list[str] = dataclasses.field(default_factory=list)  # model tensors replaced by the source's
    resized: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)  # (path, source, model)
    reinitialised: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)  # the head
    kept_init: list[str] = dataclasses.field(default_factory=list)  # model tensors left at their init
    unmatched_source: list[str] = dataclasses.field(default_factory=list)  # source tensors with no place
    skipped: list[str] = dataclasses.field(default_factory=list)  # source tensors without weights
    shape_mismatches: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)  # allowed ones

    def summary(self) -> str:
        """One paragraph for a log."""
        parts = [f"{self.model_name} initialised from {self.source} ({_FAMILIES[self.family]}): "
                 f"{len(self.loaded)} tensors loaded"]
        if self.resized:
            parts.append("resized " + ", ".join(f"{p} {a} -> {b}" for p, a, b in self.resized))
        if self.reinitialised:
            parts.append("head re-initialised (" + ", ".join(f"{p}: source {a}, model {b}"
                                                              for p, a, b in self.reinitialised) + ")")
        if self.kept_init:
            parts.append(f"{len(self.kept_init)} left at their init: {_few(self.kept_init)}")
        if self.unmatched_source:
            parts.append(f"{len(self.unmatched_source)} source tensors unused: {_few(self.unmatched_source)}")
        if self.skipped:
            parts.append(f"{len(self.skipped)} without weights skipped (num_batches_tracked)")
        return "; ".join(parts) + "."


def _few(names: Sequence[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --------------------------------------------------------------------------------------------------- public API


def load_init(path: str, params, batch_stats, *, model_name: str, strict: bool = True,
              image_shape: Sequence[int] | None = None) -> tuple[Any, Any, InitReport]:
    """(params, batch_stats, report): the model's fresh trees with every tensor that ``path`` has for them
    replaced (float32 numpy arrays), in the same kind of dicts (frozen or plain) as given.

    ``image_shape`` ((H, W) or (H, W, C) of the model's inputs) is needed only to resize a ViT position
    embedding to a non-square grid; a square grid is assumed otherwise."""
    tensors, source = read_source(path)
    moves, report = plan_init({k: np.shape(v) for k, v in tensors.items()}, params, batch_stats,
                              model_name=model_name, source=source, strict=strict, image_shape=image_shape)
    values = {target: _convert(tensors[m.source], m) for target, m in moves.items()}
    return _replace(params, "params", values), _replace(batch_stats, "batch_stats", values), report


def read_source(path: str) -> tuple[dict[str, np.ndarray], str]:
    """({name: array}, description): our trees flattened to ``params/...``/``batch_stats/...`` names, or a
    PyTorch state dict with its own names."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_workdir(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: init weights are a run's workdir, an exported .msgpack, "
                                "a .safetensors or a torch .pth/.pt/.bin file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".msgpack":
        return _read_export(path)
    if suffix == ".safetensors":
        return _strip_module(_read_safetensors(path)), path
    if suffix in TORCH_SUFFIXES:
        return _strip_module(_read_torch(path)), path
    raise PretrainedError(f"{path}: unknown kind of weights file {suffix or '(no suffix)'}; use a run's workdir, "
                          "an exported .msgpack, a .safetensors or a torch .pth/.pt/.bin file")


@dataclasses.dataclass(frozen=True)
class Move:
    """One model tensor taken from the source: ``kind`` conv | linear | copy | resize."""

    source: str
    kind: str
    shape: tuple  # the model's
    grid: tuple[int, int] | None = None  # resize: the model's patch grid (rows, cols)


def plan_init(source_shapes: Mapping[str, Sequence[int]], params, batch_stats, *, model_name: str,
              source: str = "source", strict: bool = True,
              image_shape: Sequence[int] | None = None) -> tuple[dict[str, Move], InitReport]:
    """({model path: Move}, report) from shapes only (the trees' leaves may be abstract, e.g. from
    ``jax.eval_shape``): every check ``load_init`` makes, without reading or converting any value."""
    targets = _flat_shapes(params, "params") | _flat_shapes(batch_stats, "batch_stats")
    family = _family(source_shapes, source)
    if family != "ours":
        _check_architecture(family, source_shapes, targets, model_name, source)
    report = InitReport(source=source, family=family, model_name=model_name)
    grid = _target_grid(targets, image_shape)
    moves: dict[str, Move] = {}
    for name, shape in source_shapes.items():
        found = (name, _POS_KIND.get(name, "copy")) if family == "ours" else _torch_target(name, family)
        if found == _SKIP:
            report.skipped.append(name)
        elif found is None or found[0] not in targets:
            report.unmatched_source.append(name)
        else:
            move = _fit(name, tuple(shape), found[0], found[1], targets[found[0]], report, grid)
            if move is not None:
                moves[found[0]] = move
    _reinit_head(moves, report)
    report.loaded = [p for p in targets if p in moves]
    report.kept_init = [p for p in targets if p not in moves]
    if strict:
        _refuse_leftovers(report, source_shapes, model_name)
    return moves, report


# --------------------------------------------------------------------------------------------------- planning


def _flat_shapes(tree, collection: str) -> dict[str, tuple]:
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict

    if not tree:
        return {}
    return {f"{collection}/" + "/".join(k): tuple(v.shape) if hasattr(v, "shape") else np.shape(v)
            for k, v in flatten_dict(unfreeze(tree)).items()}


def _family(source_shapes: Mapping[str, Any], source: str) -> str:
    """ours | resnet | vit, from the tensor names alone."""
    names = list(source_shapes)
    if not names:
        raise PretrainedError(f"{source}: holds no tensors")
    if all(n.startswith(("params/", "batch_stats/")) for n in names):
        return "ours"
    if "patch_embed.proj.weight" in source_shapes:
        return "vit"
    if "conv1.weight" in source_shapes and any(n.startswith("layer1.") for n in names):
        return "resnet"
    raise PretrainedError(f"{source}: neither a torchvision/timm ResNet (conv1.weight, layer1.*) nor a timm ViT "
                          f"(patch_embed.proj.weight) state dict; its first keys: {_few(sorted(names), 4)}")


def _check_architecture(family: str, source_shapes, targets: Mapping[str, tuple], model_name: str,
                        source: str) -> None:
    """One line for a source of another architecture, before any tensor-level message could confuse it."""
    ours = "resnet" if "params/stem_conv/kernel" in targets else "vit" if _POS in targets else None
    if ours != family:
        what = {"resnet": "a ResNet", "vit": "a ViT", None: "neither a ResNet nor a ViT"}[ours]
        raise PretrainedError(f"{source}: a {_FAMILIES[family]} cannot initialise model {model_name!r}, which is "
                              f"{what}")
    if family == "resnet":
        have = _resnet_layout(source_shapes, r"layer([1-9]\d*)\.(\d+)\.", r"layer\d+\.\d+\.conv3\.", 1)
        want = _resnet_layout(targets, r"params/stage(\d+)_block(\d+)/", r"params/stage\d+_block\d+/Conv_2/", 0)
        if have != want:
            raise PretrainedError(f"{source}: the weights of {_resnet_desc(*have)} do not fit model {model_name!r}, "
                                  f"{_resnet_desc(*want)}")
    else:
        have = _count_blocks(source_shapes, r"blocks\.(\d+)\.")
        want = _count_blocks(targets, r"params/block(\d+)/")
        if have != want:
            raise PretrainedError(f"{source}: the ViT weights have {have} blocks, model {model_name!r} has {want}")
        have, want = source_shapes["patch_embed.proj.weight"], targets["params/patch_embed/kernel"]
        if have[0] != want[-1]:
            raise PretrainedError(f"{source}: the ViT weights have width {have[0]} (patch_embed.proj.weight "
                                  f"{tuple(have)}), model {model_name!r} has {want[-1]} (params/patch_embed/kernel "
                                  f"{want})")


def _resnet_layout(names, block_re: str, bottleneck_re: str, first: int) -> tuple[tuple[int, ...], bool]:
    """(blocks per stage, bottleneck?) from tensor names."""
    stages: dict[int, set] = collections.defaultdict(set)
    for n in names:
        m = re.match(block_re, n)
        if m:
            stages[int(m[1]) - first].add(int(m[2]))
    sizes = tuple(len(stages.get(i, ())) for i in range(max(stages, default=-1) + 1))
    return sizes, any(re.match(bottleneck_re, n) for n in names)


def _resnet_desc(sizes: tuple, bottleneck: bool) -> str:
    name = _RESNETS.get((sizes, bottleneck), "a ResNet")
    return f"{name} ({'Bottleneck' if bottleneck else 'BasicBlock'} blocks, {sizes} per stage)"


def _count_blocks(names, block_re: str) -> int:
    return len({m[1] for m in (re.match(block_re, n) for n in names) if m})


_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
       "running_var": ("batch_stats", "var")}
_VIT_FIXED = {"patch_embed.proj": ("patch_embed", "conv"), "norm": ("ln_final", "ln"), "head": ("head", "linear")}
_VIT_BLOCK = {"norm1": ("ln1", "ln"), "norm2": ("ln2", "ln"), "attn.qkv": ("attn/qkv", "linear"),
              "attn.proj": ("attn/out", "linear"), "mlp.fc1": ("mlp/fc1", "linear"), "mlp.fc2": ("mlp/fc2", "linear")}
_VIT_TOP = {"cls_token": ("params/cls_token", "copy"), "pos_embed": (_POS, "resize")}


def _resnet_module(module: str) -> tuple[str, str] | None:
    """torch module path -> (our module path, layer kind), e.g. layer2.0.bn1 -> (stage1_block0/BatchNorm_0, bn)."""
    fixed = {"conv1": ("stem_conv", "conv"), "bn1": ("stem_bn", "bn"), "fc": ("head", "linear")}
    if module in fixed:
        return fixed[module]
    m = re.fullmatch(r"layer([1-9]\d*)\.(\d+)\.(conv|bn)([1-9]\d*)", module)
    if m:
        return f"stage{int(m[1]) - 1}_block{m[2]}/{'Conv' if m[3] == 'conv' else 'BatchNorm'}_{int(m[4]) - 1}", m[3]
    m = re.fullmatch(r"layer([1-9]\d*)\.(\d+)\.downsample\.([01])", module)
    if m:
        conv = m[3] == "0"
        return f"stage{int(m[1]) - 1}_block{m[2]}/{'proj_conv' if conv else 'proj_bn'}", "conv" if conv else "bn"
    return None


def _vit_module(module: str) -> tuple[str, str] | None:
    if module in _VIT_FIXED:
        return _VIT_FIXED[module]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m and m[2] in _VIT_BLOCK:
        ours, kind = _VIT_BLOCK[m[2]]
        return f"block{m[1]}/{ours}", kind
    return None


def _torch_target(name: str, family: str):
    """(our path, conversion kind) for a torch tensor name, _SKIP, or None when the model has no such tensor."""
    module, _, leaf = name.rpartition(".")
    if family == "vit" and not module:
        return _VIT_TOP.get(leaf)
    found = (_resnet_module if family == "resnet" else _vit_module)(module)
    if found is None:
        return None
    path, kind = found
    if kind == "bn":
        if leaf == "num_batches_tracked":
            return _SKIP
        return (f"{_BN[leaf][0]}/{path}/{_BN[leaf][1]}", "copy") if leaf in _BN else None
    if leaf == "bias":
        return f"params/{path}/bias", "copy"
    if leaf == "weight":
        return f"params/{path}/{'scale' if kind == 'ln' else 'kernel'}", "copy" if kind == "ln" else kind
    return None


def _converted_shape(kind: str, shape: tuple) -> tuple | None:
    """The source shape in our layout; None when its rank does not fit the conversion."""
    if kind == "conv":
        return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else None
    if kind == "linear":
        return (shape[1], shape[0]) if len(shape) == 2 else None
    return shape


_LAYOUT = {"conv": "OIHW -> HWIO", "linear": "(out, in) -> (in, out)"}


def _fit(name: str, shape: tuple, target: str, kind: str, want: tuple, report: InitReport, grid) -> Move | None:
    """The Move for one tensor, the head's mismatch recorded (None), or a one-line error."""
    have = _converted_shape(kind, shape)
    if have == want:
        return Move(name, kind, want)
    layout = f" ({have} after {_LAYOUT[kind]})" if kind in _LAYOUT and have is not None else ""
    if target.startswith(_HEAD):
        report.shape_mismatches.append((target, shape, want))
        report.reinitialised.append((target, shape, want))
        return None
    if kind == "resize":
        _check_resizable(name, shape, want, grid, report.source, report.model_name)
        report.shape_mismatches.append((target, shape, want))
        report.resized.append((target, shape, want))
        return Move(name, kind, want, grid)
    raise PretrainedError(f"{report.source}: tensor {name} has shape {shape}{layout}, but model "
                          f"{report.model_name!r} has {target} of shape {want}")


def _target_grid(targets: Mapping[str, tuple], image_shape) -> tuple[int, int] | None:
    """The model's patch grid (rows, cols): from image_shape and the patch size, else a square root."""
    if _POS not in targets:
        return None
    tokens = targets[_POS][1] - 1
    if image_shape is not None:
        patch = targets["params/patch_embed/kernel"][:2]
        return image_shape[0] // patch[0], image_shape[1] // patch[1]
    side = math.isqrt(max(tokens, 0))
    return (side, side) if side * side == tokens else None


def _check_resizable(name: str, shape: tuple, want: tuple, grid, source: str, model_name: str) -> None:
    side = math.isqrt(max(shape[1] - 1, 0)) if len(shape) == 3 else 0
    if len(shape) != 3 or shape[0] != 1 or shape[2] != want[2] or side * side != shape[1] - 1 or side == 0:
        raise PretrainedError(f"{source}: tensor {name} has shape {shape}, model {model_name!r}'s position "
                              f"embedding {want}: only (1, 1 + n*n, width) embeddings of the same width resize")
    if grid is None or grid[0] * grid[1] != want[1] - 1:
        raise PretrainedError(f"{source}: cannot tell the patch grid of model {model_name!r}'s {want[1] - 1} "
                              "position tokens; pass image_shape=(H, W) to resize the position embedding")


def _reinit_head(moves: dict[str, Move], report: InitReport) -> None:
    """A head with any mismatching tensor is re-initialised whole (kernel and bias)."""
    if report.reinitialised:
        for path in [p for p in moves if p.startswith(_HEAD)]:
            del moves[path]


def _refuse_leftovers(report: InitReport, source_shapes, model_name: str) -> None:
    """strict: a source tensor with no place, or a model tensor (but the head) with no source, is an error."""
    if report.unmatched_source:
        name = report.unmatched_source[0]
        raise PretrainedError(f"{report.source}: {len(report.unmatched_source)} tensor(s) have no place in model "
                              f"{model_name!r}, first {name} {tuple(source_shapes[name])}: the architectures "
                              "differ (strict=False loads the rest)")
    missing = [p for p in report.kept_init if not p.startswith(_HEAD)]
    if missing:
        raise PretrainedError(f"{report.source}: no tensor for {len(missing)} of model {model_name!r}'s tensors, "
                              f"first {missing[0]}: the architectures differ (strict=False loads the rest)")


# --------------------------------------------------------------------------------------------------- applying


def _convert(x, move: Move) -> np.ndarray:
    x = np.asarray(x)
    x = x.astype(np.float32) if x.dtype != np.float32 else x
    if move.kind == "conv":
        x = x.transpose(2, 3, 1, 0)
    elif move.kind == "linear":
        x = x.T
    elif move.kind == "resize" and x.shape != move.shape:
        x = resize_pos_embedding(x, move.grid)
    return np.ascontiguousarray(x)


def resize_pos_embedding(pos: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(1, 1 + g*g, D) -> (1, 1 + rows*cols, D): the class-token row kept, the square grid part resampled
    bicubically with antialias, as timm's ``resample_abs_pos_embed`` (float32, on the CPU: deterministic)."""
    import jax

    side = math.isqrt(pos.shape[1] - 1)
    d = pos.shape[2]
    square = np.asarray(pos[0, 1:], np.float32).reshape(side, side, d)
    try:
        device = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: the default device
        device = None
    with jax.default_device(device):
        out = np.asarray(jax.image.resize(square, (grid[0], grid[1], d), method="cubic", antialias=True))
    return np.concatenate([pos[:, :1].astype(np.float32), out.reshape(1, -1, d)], axis=1)


def _replace(tree, collection: str, values: Mapping[str, np.ndarray]):
    """``tree`` with the leaves named in ``values`` replaced; frozen in, frozen out."""
    from flax.core import FrozenDict, freeze, unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    if not tree:
        return tree
    flat = flatten_dict(unfreeze(tree))
    for key in flat:
        name = f"{collection}/" + "/".join(key)
        if name in values:
            flat[key] = values[name]
    out = unflatten_dict(flat)
    return freeze(out) if isinstance(tree, FrozenDict) else out


# --------------------------------------------------------------------------------------------------- reading


def _flatten_tree(tree, collection: str) -> dict[str, np.ndarray]:
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict

    if not tree:
        return {}
    return {f"{collection}/" + "/".join(k): np.asarray(v) for k, v in flatten_dict(unfreeze(tree)).items()}


def _read_workdir(path: str) -> tuple[dict[str, np.ndarray], str]:
    """The newest checkpoint's params and batch_stats (the optimizer state is not kept)."""
    import jax

    from fastgpu_jax import quiet
    from fastgpu_jax.evaluate import restore_state

    if not os.path.exists(os.path.join(path, "config.json")):
        raise PretrainedError(f"{path}: a folder without config.json is not a run's workdir (init weights are a "
                              "workdir, an exported .msgpack, a .safetensors or a torch .pth/.pt/.bin file)")
    with quiet.absl_warnings():  # Orbax's notes on the read-only options: load_init prints nothing
        cfg, state, step = restore_state(path)
    params, batch_stats = jax.device_get((state.params, state.batch_stats))
    tensors = _flatten_tree(params, "params") | _flatten_tree(batch_stats, "batch_stats")
    return tensors, f"{path} (run of {cfg.model.name}, step {step})"


def _read_export(path: str) -> tuple[dict[str, np.ndarray], str]:
    from fastgpu_jax import inference

    payload = inference.read_payload(path, inference.FORMAT, "export",
                                     "write it with `fastgpu-jax export --workdir D --output FILE`")
    model = json.loads(payload.get("config") or "{}").get("model.name", "?")
    tensors = _flatten_tree(payload["params"], "params") | _flatten_tree(payload.get("batch_stats"), "batch_stats")
    return tensors, f"{path} (export of {model}, step {payload.get('step', '?')})"


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        import safetensors.numpy
    except ImportError as e:  # a dependency of the project; this only helps a partial install
        raise PretrainedError(f"{path}: reading .safetensors needs the safetensors package (pip install "
                              "safetensors)") from e
    try:
        return dict(safetensors.numpy.load_file(path))
    except Exception as e:  # the library's own message names what is wrong with the file
        raise PretrainedError(f"{path}: not a readable .safetensors file: {str(e).splitlines()[0]}") from e


def _strip_module(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops the "module." prefix torch's DistributedDataParallel puts on every name."""
    if tensors and all(k.startswith("module.") for k in tensors):
        return {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _read_torch(path: str) -> dict[str, np.ndarray]:
    """The state dict in a torch.save zip archive: ``<name>/data.pkl`` (the pickle) + ``<name>/data/<key>``
    (one raw little-endian buffer per storage, unless ``<name>/byteorder`` says big)."""
    if not zipfile.is_zipfile(path):
        raise PretrainedError(f"{path}: not a torch.save zip archive (legacy pre-1.6 format?); re-save it with "
                              "torch.save from torch >= 1.6, or as .safetensors")
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pickles) != 1:
            raise PretrainedError(f"{path}: a torch.save archive holds one <name>/data.pkl; found {len(pickles)}")
        prefix = pickles[0][:-len("data.pkl")]
        names = set(zf.namelist())
        order = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        with zf.open(pickles[0]) as f:
            obj = _StateDictUnpickler(f, path, zf, prefix, order).load()
    return _state_dict_in(obj, path)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def _state_dict_in(obj, path: str) -> dict[str, np.ndarray]:
    """The state dict itself, or the one a checkpoint dict holds under "state_dict" or "model"."""
    if _is_state_dict(obj):
        return dict(obj)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and _is_state_dict(obj.get(key)):
            return dict(obj[key])
    keys = f"its keys: {_few([str(k) for k in obj], 5)}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise PretrainedError(f"{path}: holds no state dict (a dict of tensors, or one under 'state_dict' or 'model'); "
                          f"{keys}")


# torch storage type -> numpy dtype name ("bfloat16" comes from ml_dtypes, jax's own dependency)
_STORAGE_DTYPES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
                   "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                   "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
                   "UntypedStorage": "uint8"}
# Data-only globals of training checkpoints (timm's train.py saves its argparse args and numpy metrics beside the
# state dict): they resolve to an inert placeholder, never to the real callable.
_INERT = {("argparse", "Namespace"), ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"),
          ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
          ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: str


class _Inert:
    """Stands in for a data-only object of a checkpoint dict: takes any arguments and state, does nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the globals a torch state dict needs, each to a function of this module; refuses the rest
    by name. Storages are read from the archive as numpy arrays (``persistent_load``)."""

    def __init__(self, file, path: str, zf: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        if byteorder not in ("little", "big"):
            raise PretrainedError(f"{path}: byteorder {byteorder!r} is neither little nor big")
        self.path, self.zf, self.prefix, self.byteorder = path, zf, prefix, byteorder
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        allowed = {("collections", "OrderedDict"): collections.OrderedDict,
                   ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
                   ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                   ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter}
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _INERT:
            return _Inert
        raise UnsafePickleError(f"{self.path}: refused to unpickle the global {module}.{name}: a state dict needs "
                                "only tensors and plain containers (nothing from the file was run; save "
                                "model.state_dict() with torch.save, or as .safetensors)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise PretrainedError(f"{self.path}: unknown persistent id {str(pid)[:80]} (not a torch storage)")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            self.storages[key] = self._read_storage(storage_type.dtype, key, int(numel))
        return self.storages[key]

    def _read_storage(self, dtype_name: str, key: str, numel: int) -> np.ndarray:
        entry = f"{self.prefix}data/{key}"
        try:
            raw = self.zf.read(entry)
        except KeyError:
            raise PretrainedError(f"{self.path}: storage {entry} named by the pickle is missing") from None
        dtype = _numpy_dtype(dtype_name)
        if len(raw) < numel * dtype.itemsize:
            raise PretrainedError(f"{self.path}: storage {entry} has {len(raw)} bytes, {numel} x {dtype} expected")
        if dtype_name == "bfloat16":  # no byte-order variants of ml_dtypes' type: swap as uint16
            bits = np.frombuffer(raw, "<u2" if self.byteorder == "little" else ">u2", numel)
            return bits.astype(np.uint16).view(dtype)
        return np.frombuffer(raw, dtype.newbyteorder("<" if self.byteorder == "little" else ">"), numel)

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        """torch._utils._rebuild_tensor_v2: a (copied) strided view of the storage."""
        size, stride, offset = tuple(int(n) for n in size), tuple(int(s) for s in stride), int(offset)
        if not isinstance(storage, np.ndarray) or len(size) != len(stride):
            raise PretrainedError(f"{self.path}: malformed tensor record (size {size}, stride {stride})")
        if 0 in size:
            return np.zeros(size, storage.dtype)
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if offset < 0 or min(stride, default=0) < 0 or end > storage.size:
            raise PretrainedError(f"{self.path}: a tensor of size {size}, stride {stride} at offset {offset} runs "
                                  f"past its storage of {storage.size} elements")
        view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * storage.itemsize for s in stride))
        return np.array(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data."""
    return data


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
