"""Benchmarks. Kernels: Pallas vs XLA in TFLOP/s on the shapes training runs. Models: the train step's time,
examples/s, scaling over device counts, FLOPs and MFU.

    fastgpu-jax bench --kernels [--tiny] [--json out.json]     (also: python benchmarks/kernels.py)
    fastgpu-jax bench --config C [--devices 1,2,4,8] [--backends xla,pallas] [--steps N] [--json out.json]

Matmul: ResNet-50's classifier, ViT-B/16 projections and MLP at 256 x 197 tokens, a transformer MLP at
8192 tokens, 4096³ and 8192³, all bf16. Conv: forward, input gradient (dgrad) and weight gradient (wgrad)
of every distinct convolution in ResNet-50 at batch 256 (collected by tracing the model, not typed in), bf16.
Each time is the median of ``iters`` calls after warm-up, with ``block_until_ready``. The last row is the
geometric mean of the Pallas/XLA ratios. ``tiny`` shrinks every shape (for CPU, where Pallas runs in the
interpreter and the numbers only show that the script works).

A model benchmark needs only the data's shapes: when the config's data files are absent (no ``data.dir``,
or files not there) it times random data of the data set's image shape and ``model.num_classes`` instead,
and prints one line saying so. Files that are present but broken are still an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp

from fastgpu_jax import models, roofline
from fastgpu_jax.nn import backend
from fastgpu_jax.pallas_kernels import conv2d as pallas_conv2d, lowering, matmul as pallas_matmul, tuning
from fastgpu_jax.pallas_kernels.conv2d import route_of

MATMUL_SHAPES = [  # (name, M, K, N)
    ("resnet50 fc", 256, 2048, 1000),
    ("vit-b16 qkv", 256 * 197, 768, 3 * 768),
    ("vit-b16 attn-out", 256 * 197, 768, 768),
    ("vit-b16 mlp-up", 256 * 197, 768, 3072),
    ("vit-b16 mlp-down", 256 * 197, 3072, 768),
    ("gpt mlp-up 8k tok", 8192, 4096, 16384),
    ("square 4096", 4096, 4096, 4096),
    ("square 8192", 8192, 8192, 8192),
]


@dataclasses.dataclass
class Row:
    name: str
    op: str
    flops: float
    xla_s: float
    pallas_s: float
    kernel: str = ""  # the Pallas kernel that ran it: "matmul" or "conv2d" (1x1/patchify/stem convs are matmuls)
    shape_class: str = ""  # that kernel's tuning shape class
    error: float = float("nan")  # max |Pallas - XLA| / max |XLA| over the outputs (``output_error``)

    @property
    def ratio(self) -> float:
        """Pallas speed relative to XLA (> 1: Pallas faster)."""
        return self.xla_s / self.pallas_s

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio, "xla_tflops": self.flops / self.xla_s / 1e12,
                "pallas_tflops": self.flops / self.pallas_s / 1e12}


def resnet50_convs(batch: int = 256, image: int = 224) -> list[dict]:
    """Every distinct conv of ResNet-50 (x shape, w shape, strides, padding), by tracing the model."""
    model = models.build("resnet50", num_classes=1000)
    with backend.record_ops() as calls:
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, image, image, 3))))
    seen, out = set(), []
    for op, _, info in calls:
        if op != "conv2d":
            continue
        key = (info["shape"], info["strides"], str(info["padding"]))
        if key not in seen:
            seen.add(key)
            out.append({"x": info["shape"][0], "w": info["shape"][1], "strides": info["strides"],
                        "padding": info["padding"]})
    return out


def _conv_impls(strides, padding) -> dict:
    """{"xla": f, "pallas": f} computing one conv as f(x, w)."""
    kwargs = {"strides": strides, "padding": padding, "dilation": (1, 1)}
    return {"xla": lambda x, w: backend._xla_conv2d(x, w, **kwargs),
            "pallas": lambda x, w: pallas_conv2d(x, w, **kwargs)}


def _pass(kind: str, f: Callable) -> Callable:
    """One pass of the op f(x, w) of a train step: "fwd" f(x, w); "dgrad" / "wgrad" (x, w, dy) -> dx / dw."""
    if kind == "fwd":
        return f
    if kind == "dgrad":
        return lambda x, w, dy: jax.vjp(lambda x: f(x, w), x)[1](dy)
    return lambda x, w, dy: jax.vjp(lambda w: f(x, w), w)[1](dy)


class _Record:
    """A run's rows, written to ``json_path`` after each one (``"complete": false`` until the end), so a run stopped
    by a time limit keeps what it measured; and the shapes that failed, named in ``"errors"`` instead of ending
    the run (one kernel failing on a GPU must not cost the rest of the measurements)."""

    def __init__(self, json_path: str | None, header: dict):
        self.json_path, self.header, self.rows, self.errors = json_path, header, [], []

    def add(self, row) -> None:
        self.rows.append(row)
        self.save()

    def fail(self, label: str, err: Exception) -> None:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"FAILED: {label}: {type(err).__name__}: {first}", flush=True)
        self.errors.append({"what": label, "error": f"{type(err).__name__}: {first}"})
        self.save()

    def save(self, complete: bool = False) -> None:
        if self.json_path:
            rows = [r.as_dict() if isinstance(r, Row) else r for r in self.rows]
            with open(self.json_path, "w") as f:
                json.dump({**self.header, "complete": complete, "errors": self.errors, "rows": rows}, f, indent=2)


WRONG = 2e-2  # an ``output_error`` above this is a kernel computing something else, not bf16 rounding


def output_error(reference, got) -> float:
    """max |got - reference| / max |reference| over all outputs (pytrees), in float32: bf16 rounding and another
    summation order stay well under ``WRONG``; a kernel that reads the wrong tile or misses a wait does not.
    A NaN or infinity in either is ``inf`` (wrong), not a NaN that every comparison would let through."""
    pairs = list(zip(jax.tree.leaves(reference), jax.tree.leaves(got)))
    diff = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)))) for r, g in pairs)
    scale = max(float(jnp.max(jnp.abs(r.astype(jnp.float32)))) for r, _ in pairs)
    if not (math.isfinite(diff) and math.isfinite(scale)):
        return math.inf
    return diff / scale if scale else diff


def _time_impls(make: Callable[[str], Callable], args: tuple, iters: int, label: str,
                lowerings: tuple[str, ...]) -> tuple[float, dict]:
    """XLA's seconds per call, and per Pallas lowering either (Pallas seconds, the Pallas output's
    ``output_error`` against XLA's) or the exception it raised. XLA is compiled and timed once for all the
    lowerings (a GPU sweep's time goes to compiling). A speed figure is worth nothing if the kernel is wrong
    there, and on a GPU the sweep is what runs every shape. Says what it compiles and times, since each can take a
    while."""
    start = time.perf_counter()
    print(f"bench: {label} (compile + {iters} timed call(s), XLA then Pallas on {', '.join(lowerings)}) ...",
          end=" ", flush=True)
    xla = jax.jit(make("xla"))
    xla_s = tuning.time_fn(xla, *args, warmup=1, iters=iters)
    reference = xla(*args)
    per: dict = {}
    for low in lowerings:
        try:
            with lowering.use_lowering(low):  # jit traces at the first call, inside
                fn = jax.jit(make("pallas"))
                pallas_s = tuning.time_fn(fn, *args, warmup=1, iters=iters)
                per[low] = (pallas_s, output_error(reference, fn(*args)))
        except Exception as e:  # noqa: BLE001 (recorded for this lowering; the others go on)
            per[low] = e
    wrong = [low for low, r in per.items() if not isinstance(r, Exception) and r[1] > WRONG]
    print(f"{time.perf_counter() - start:.1f} s" + (f" (WRONG output on {', '.join(wrong)})" if wrong else ""),
          flush=True)
    return xla_s, per


def _measure(records: dict[str, _Record], label: str, make: Callable[[str], Callable], args: tuple, iters: int,
             row: Callable[[float, float, float], Row]) -> None:
    """Times one shape on XLA and on each lowering of ``records`` and adds ``row(xla_s, pallas_s, error)`` to
    that lowering's record, or names the failure there (an XLA failure in every record)."""
    try:
        xla_s, per = _time_impls(make, args, iters, label, tuple(records))
    except Exception as e:  # noqa: BLE001 (named in the JSON; the sweep goes on)
        for record in records.values():
            record.fail(label, e)
        return
    for low, result in per.items():
        if isinstance(result, Exception):
            records[low].fail(label, result)
        else:
            records[low].add(row(xla_s, *result))


def bench_matmuls(tiny: bool, iters: int, records: dict[str, _Record]) -> None:
    for name, m, k, n in MATMUL_SHAPES:
        if tiny:
            m, k, n = (max(16, d // 256) for d in (m, k, n))
        key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
        a = jax.random.normal(key_a, (m, k), jnp.bfloat16)
        b = jax.random.normal(key_b, (k, n), jnp.bfloat16)

        def make(impl):
            return (lambda a, b: a @ b) if impl == "xla" else (lambda a, b: pallas_matmul(a, b))

        label, shape_class = f"{name} {m}x{k}x{n}", tuning.matmul_shape_class(m, n, k)
        _measure(records, f"matmul {label}", make, (a, b), iters,
                 lambda xla_s, pallas_s, error, label=label, flops=2.0 * m * n * k, shape_class=shape_class:
                 Row(label, "matmul", flops, xla_s, pallas_s, "matmul", shape_class, error))


def bench_convs(tiny: bool, iters: int, records: dict[str, _Record]) -> None:
    convs = resnet50_convs(batch=2 if tiny else 256, image=32 if tiny else 224)
    done = set()
    for conv in convs:
        x_shape, w_shape = conv["x"], conv["w"]
        if tiny:
            w_shape = w_shape[:2] + (max(3, w_shape[2] // 16), max(16, w_shape[3] // 16))
            x_shape = x_shape[:3] + (w_shape[2],)
            conv = dict(conv, x=x_shape, w=w_shape)
        if (x_shape, w_shape, conv["strides"]) in done:  # shrinking can make two layers alike
            continue
        done.add((x_shape, w_shape, conv["strides"]))
        out = roofline.conv_out_shape(x_shape, w_shape, conv["strides"], conv["padding"])
        kx, kw, kg = jax.random.split(jax.random.PRNGKey(1), 3)
        x = jax.random.normal(kx, x_shape, jnp.bfloat16)
        w = jax.random.normal(kw, w_shape, jnp.bfloat16)
        dy = jax.random.normal(kg, out, jnp.bfloat16)
        impls = _conv_impls(conv["strides"], conv["padding"])
        flops = 2.0 * math.prod(out) * w_shape[0] * w_shape[1] * w_shape[2]
        kh, kw_, cin, cout = w_shape
        label = f"{x_shape[1]}x{x_shape[2]}x{cin}->{cout} k{kh}x{kw_} s{conv['strides'][0]}"
        kernel, shape_class = _conv_kernel(x_shape, w_shape, conv["strides"], conv["padding"], math.prod(out[:3]))
        for kind in ("fwd", "dgrad", "wgrad"):
            args = (x, w) if kind == "fwd" else (x, w, dy)
            _measure(records, f"conv {kind} {label}", lambda impl, kind=kind: _pass(kind, impls[impl]), args, iters,
                     lambda xla_s, pallas_s, error, kind=kind:
                     Row(label, f"conv {kind}", flops, xla_s, pallas_s, kernel, shape_class, error))


def _conv_kernel(x_shape, w_shape, strides, padding, pixels: int) -> tuple[str, str]:
    """(kernel, shape class) that runs this conv on Pallas: the implicit-GEMM conv, or the matmul it routes to."""
    if route_of(x_shape, w_shape, strides, padding) == "implicit_gemm":
        return "conv2d", tuning.conv_shape_class(w_shape[2], w_shape[3])
    return "matmul", tuning.matmul_shape_class(pixels, w_shape[3], math.prod(w_shape[:3]))


def lowering_verdicts(triton: dict, mosaic: dict) -> list[dict]:
    """Per (GPU kind, kernel, shape class): the geometric-mean speed of each lowering relative to XLA over the
    rows two kernel sweeps (``bench --kernels --json``, one per ``--lowering``) share, which is faster, and
    whether the faster one beats XLA: the measurements ``auto`` is meant to follow
    (``tuning.TRITON_FASTER_THAN_MOSAIC``, ``tuning.FASTER_THAN_XLA``)."""
    kinds = {tuning.kind_of(sweep["device"]) for sweep in (triton, mosaic)}
    if len(kinds) != 1 or triton.get("tiny") or mosaic.get("tiny"):
        raise ValueError(f"lowering verdicts need two full-size sweeps on one GPU kind, got kinds {sorted(kinds)} "
                         f"and tiny={triton.get('tiny')}/{mosaic.get('tiny')}")
    by_key = {(r["op"], r["name"]): r for r in mosaic["rows"]}
    groups: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for r in triton["rows"]:
        m = by_key.get((r["op"], r["name"]))
        if m is not None and r.get("kernel"):
            groups.setdefault((r["kernel"], r["shape_class"]), []).append((r, m))
    (kind,) = kinds
    out = []
    for (kernel, shape_class), pairs in sorted(groups.items()):
        t, m = (geomean([p[i]["ratio"] for p in pairs]) for i in (0, 1))
        # a lowering that computed a wrong output on any shape of the group is never the one auto takes
        t_ok, m_ok = (not any(p[i].get("error", 0) > WRONG for p in pairs) for i in (0, 1))
        triton_faster = t_ok and (t > m or not m_ok)
        best = t if triton_faster else m
        out.append(dict(kind=kind, op=kernel, shape_class=shape_class, rows=len(pairs), triton_vs_xla=t,
                        mosaic_vs_xla=m, triton_wrong=not t_ok, mosaic_wrong=not m_ok, triton_faster=triton_faster,
                        faster_than_xla=(t_ok or m_ok) and best > 1.0))
    return out


def mosaic_targets(sweeps: dict[str, dict], rooflines: dict[str, list[dict]]) -> list[dict]:
    """The Mosaic GPU kernels' targets, measured. ``sweeps`` maps a lowering ("mosaic", "triton") to its
    ``bench --kernels`` JSON, ``rooflines`` a lowering to its ``bench --kernels --model`` JSONs. ResNet-50's
    train-step passes come from the sweeps (every distinct conv, three passes each, and the classifier's forward),
    ViT-B/16's from its roofline runs (each Dense and the patchify, three passes each). Each row: ``what``,
    ``measured`` (a geometric-mean speed ratio; None where its runs are missing), ``goal`` (None: for comparison
    only) and ``shapes`` (how many timed passes it covers)."""
    def resnet(low, kernel):  # {(pass, layer): sweep row}
        return {(r["op"], r["name"]): r for r in sweeps.get(low, {}).get("rows", [])
                if r.get("kernel") == kernel and (r["op"].startswith("conv") or r["name"].startswith("resnet50"))}

    def vit(low):  # {(layer, pass): roofline row}
        return {(r["layer"], r["kind"]): r for run in rooflines.get(low, []) if run["model"] == "vit_b16"
                for r in run["rows"] if r.get("kernel") == "matmul" and "pallas_us" in r}

    def row(what, ratios, goal):
        return dict(what=what, measured=geomean(ratios) if ratios else None, goal=goal, shapes=len(ratios))

    out = []
    for low in ("mosaic", "triton"):
        ratios = [r["ratio"] for r in resnet(low, "matmul").values()]
        ratios += [r["xla_us"] / r["pallas_us"] for r in vit(low).values()]
        out.append(row(f"{low} matmul vs XLA, ResNet-50 + ViT-B/16 train-step passes", ratios,
                       1.05 if low == "mosaic" else None))
    for size in (4096, 8192):
        hits = [r["ratio"] for r in sweeps.get("mosaic", {}).get("rows", []) if r["name"].startswith(f"square {size}")]
        out.append(row(f"mosaic matmul vs XLA, {size}^3", hits, 1.0))
    mosaic, triton = resnet("mosaic", "conv2d"), resnet("triton", "conv2d")
    out.append(row("mosaic conv vs Triton conv, ResNet-50 implicit-GEMM passes",
                   [triton[key]["pallas_s"] / r["pallas_s"] for key, r in mosaic.items() if key in triton], 1.0))
    out.append(row("mosaic conv vs XLA, ResNet-50 implicit-GEMM passes", [r["ratio"] for r in mosaic.values()], None))
    return out


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def format_table(rows: list[Row]) -> str:
    head = f"{'op':<11} {'shape':<40} {'XLA TF/s':>9} {'Pallas TF/s':>11} {'ratio':>6} {'error':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.op:<11} {r.name:<40} {r.flops / r.xla_s / 1e12:>9.3g} "
                     f"{r.flops / r.pallas_s / 1e12:>11.3g} {r.ratio:>6.2f} {r.error:>8.2g}"
                     + ("  WRONG" if r.error > WRONG else ""))
    for op in sorted({r.op for r in rows}):
        lines.append(f"{op:<11} {'geometric mean (Pallas / XLA)':<40} {'':>9} {'':>11} "
                     f"{geomean([r.ratio for r in rows if r.op == op]):>6.2f}")
    return "\n".join(lines)


def run_kernel_benchmarks(*, tiny: bool | None = None, iters: int | None = None, json_path: str | None = None,
                          ops: tuple[str, ...] = ("matmul", "conv"),
                          lowerings: tuple[str, ...] | None = None) -> dict[str, list[Row]]:
    """Runs the sweep (``tiny`` defaults to True on CPU) for each Pallas lowering of ``lowerings`` (default: the
    one in force), XLA timed once per shape for all; prints a table per lowering, optionally writes a JSON per
    lowering (``json_path`` with ``{lowering}`` in it when there are several). Returns {lowering: rows}."""
    tiny = jax.default_backend() == "cpu" if tiny is None else tiny
    iters = iters or (1 if tiny else 20)
    lowerings = tuple(lowerings or (lowering.current(),))
    if json_path and len(lowerings) > 1 and "{lowering}" not in json_path:
        raise ValueError(f"--json {json_path}: a sweep of several lowerings writes one file each; put {{lowering}} "
                         f"in the name (e.g. kernel_sweep_{{lowering}}.json)")
    records = {}
    for low in lowerings:
        with lowering.use_lowering(low):
            header = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "tiny": tiny,
                      "lowering": lowering.describe(tuning.device_kind())}
        records[low] = _Record(json_path and json_path.replace("{lowering}", low), header)
    if "matmul" in ops:
        bench_matmuls(tiny, iters, records)
    if "conv" in ops:
        bench_convs(tiny, iters, records)
    for low, record in records.items():
        record.save(complete=True)
        print(f"device: {jax.devices()[0].device_kind} ({tuning.device_kind()}), jax {jax.__version__}, "
              f"{'tiny shapes (interpret mode: not a speed figure)' if tiny else 'full shapes'}, median of {iters}; "
              f"pallas lowering {record.header['lowering']}")
        print(format_table(record.rows))
        for e in record.errors:
            print(f"FAILED: {e['what']}: {e['error']}")
    return {low: record.rows for low, record in records.items()}


# --- roofline of a model's kernels ----------------------------------------------------------------------

def _pass_fns(k, dtype):
    """{impl: (fn, args)} timing one pass of one layer on XLA and on Pallas."""
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(2), 3)
    x = jax.random.normal(kx, k.x_shape, dtype)
    w = jax.random.normal(kw, k.w_shape, dtype) * 0.05
    dy = jax.random.normal(kg, k.out_shape, dtype)
    if k.op == "matmul":
        impls = {"xla": lambda x, w: x @ w, "pallas": lambda x, w: pallas_matmul(x, w)}
    else:
        impls = _conv_impls(k.strides, k.padding)
    args = (x, w) if k.kind == "fwd" else (x, w, dy)
    return {n: (_pass(k.kind, f), args) for n, f in impls.items()}


def run_roofline(model: str, *, batch: int = 256, dtype=jnp.bfloat16, iters: int = 20, measure: bool | None = None,
                 json_path: str | None = None) -> list[dict]:
    """Per distinct kernel of ``model``'s train step: GFLOP, minimum HBM MB, the H100 roofline time and, on a
    GPU (``measure``), XLA's and Pallas's measured times and the fraction of the roofline each reaches."""
    measure = jax.default_backend() == "gpu" if measure is None else measure
    record = _Record(json_path, {"model": model, "batch": batch, "dtype": jnp.dtype(dtype).name,
                                 "jax": jax.__version__, "lowering": lowering.describe(tuning.device_kind()),
                                 "device": jax.devices()[0].device_kind})
    for k in roofline.model_kernel_shapes(model, batch):
        itemsize = jnp.dtype(dtype).itemsize
        kernel = "matmul" if k.op == "matmul" else _conv_kernel(
            k.x_shape, k.w_shape, k.strides, k.padding, math.prod(k.out_shape[:3]))[0]
        row = dict(layer=k.layer + (f" +{k.activation}" if k.activation else ""), op=k.op, kind=k.kind,
                   kernel=kernel, count=k.count, gflop=k.flops / 1e9, min_mb=k.min_bytes(itemsize) / 1e6,
                   roofline_us=k.roofline_s(dtype) * 1e6, epilogue_saved_mb=k.epilogue_bytes_saved(itemsize) / 1e6)
        if measure:
            try:
                fns = {impl: (jax.jit(fn), args) for impl, (fn, args) in _pass_fns(k, dtype).items()}
                for impl, (fn, args) in fns.items():
                    row[f"{impl}_us"] = tuning.time_fn(fn, *args, warmup=1, iters=iters) * 1e6
                    row[f"{impl}_of_roofline"] = row["roofline_us"] / row[f"{impl}_us"]
                row["error"] = output_error(*(fn(*args) for fn, args in fns.values()))
            except Exception as e:  # noqa: BLE001 (named in the JSON; the run goes on)
                record.fail(f"{k.op} {k.kind} {row['layer']}", e)
                continue
        record.add(row)
    record.save(complete=True)
    print(f"roofline: {model} train-step kernels, batch {batch}, {jnp.dtype(dtype).name}; H100 SXM peaks "
          f"{roofline.H100}; device {jax.devices()[0].device_kind}" + ("" if measure else " (predicted only)"))
    print(format_roofline(record.rows))
    for e in record.errors:
        print(f"FAILED: {e['what']}: {e['error']}")
    return record.rows


def format_roofline(rows: list[dict]) -> str:
    measured = "xla_us" in (rows[0] if rows else {})
    head = f"{'layer':<30} {'pass':<5} {'n':>2} {'GFLOP':>8} {'min MB':>8} {'roof us':>8}"
    if measured:
        head += f" {'XLA us':>8} {'Pallas us':>9} {'XLA/roof':>8} {'Pal/roof':>8} {'Pal/XLA':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r['op'][0] + ' ' + r['layer']:<30} {r['kind']:<5} {r['count']:>2} {r['gflop']:>8.2f} "
                f"{r['min_mb']:>8.1f} {r['roofline_us']:>8.1f}")
        if measured:
            line += (f" {r['xla_us']:>8.1f} {r['pallas_us']:>9.1f} {r['xla_of_roofline']:>8.2f} "
                     f"{r['pallas_of_roofline']:>8.2f} {r['xla_us'] / r['pallas_us']:>7.2f}"
                     + ("  WRONG" if r.get("error", 0) > WRONG else ""))
        lines.append(line)
    saved = sum(r.get("epilogue_saved_mb", 0) * r["count"] for r in rows)
    if saved:
        lines.append(f"fused bias + activation epilogues (Dense(activation=...)) save {saved:.0f} MB of HBM traffic "
                     f"per step against a matmul followed by an elementwise op")
    total = sum(r["roofline_us"] * r["count"] for r in rows)
    lines.append(f"step total (x count): roofline {total / 1e3:.2f} ms" + (
        f", XLA {sum(r['xla_us'] * r['count'] for r in rows) / 1e3:.2f} ms, Pallas "
        f"{sum(r['pallas_us'] * r['count'] for r in rows) / 1e3:.2f} ms" if measured else ""))
    if measured:
        for op, kind in sorted({(r["op"], r["kind"]) for r in rows}):
            sel = [r["xla_us"] / r["pallas_us"] for r in rows if (r["op"], r["kind"]) == (op, kind)]
            lines.append(f"{op} {kind}: Pallas/XLA speed geomean {geomean(sel):.2f} over {len(sel)} shapes")
    return "\n".join(lines)


# --- model step benchmark: examples/s, scaling over device counts, FLOPs and MFU --------------------------

# Dense bf16 peak FLOP/s per device, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclasses.dataclass
class StepRow:
    devices: int
    strategy: str
    backend: str
    global_batch: int
    compile_s: float
    step_s: float
    flops: float | None
    peak_bytes: int | None
    efficiency: float = float("nan")

    @property
    def examples_per_s(self) -> float:
        return self.global_batch / self.step_s

    @property
    def mfu(self) -> float | None:
        peak = PEAK_FLOPS.get(tuning.device_kind())
        return None if peak is None or not self.flops else self.flops / self.step_s / (peak * self.devices)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "examples_per_s": self.examples_per_s, "mfu": self.mfu}


def xla_step_flops(state, batch) -> float | None:
    """FLOPs of one train step from XLA's cost analysis of the (lowered, single-device) program."""
    from fastgpu_jax import steps

    try:
        cost = jax.jit(steps.train_step).lower(state, batch).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 - cost analysis is best effort on some backends
        return None


def analytic_step_flops(model, input_shape: tuple) -> float:
    """3 x the forward multiply-adds of every Dense/Conv (and of ViT attention), x2 FLOPs each.

    Forward ops are collected by tracing the model (``backend.record_ops``); the backward of each costs two
    forwards (input and weight gradients). Attention is counted from each fused q/k/v projection
    (input (B, T, D), output 3D): QKᵀ and AV are 2·B·T²·D multiply-adds together. Elementwise work
    (norms, activations, softmax, the optimizer) is left out, so XLA's count runs a few percent above
    this one for small models."""
    with backend.record_ops() as calls:
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(input_shape)))
    forward = 0.0
    for op, _, info in calls:
        x_shape, w_shape = info["shape"]
        if op == "matmul":
            forward += 2.0 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]
            if len(x_shape) == 3 and w_shape[1] == 3 * w_shape[0]:
                batch, tokens, width = x_shape
                forward += 4.0 * batch * tokens * tokens * width
        else:
            out = jax.eval_shape(
                lambda x, w: backend._xla_conv2d(x, w, strides=info["strides"], padding=info["padding"],
                                                 dilation=info["dilation"]),
                jax.ShapeDtypeStruct(x_shape, jnp.float32), jax.ShapeDtypeStruct(w_shape, jnp.float32))
            forward += 2.0 * math.prod(out.shape) * w_shape[0] * w_shape[1] * w_shape[2]
    return 3.0 * forward


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def data_info(cfg):
    """The facts of ``cfg``'s data set; when its files are absent, those of a synthetic stand-in of the same
    image shape with ``model.num_classes`` classes (one printed line says so): a step's speed depends on
    shapes only."""
    from fastgpu_jax import data
    from fastgpu_jax.builders import dataset_info

    name, data_dir = cfg.data.name, cfg.data.dir
    if not data.files_missing(name, data_dir):
        return dataset_info(cfg)
    shape = data.DATASETS[name].image_shape or (cfg.data.image_size, cfg.data.image_size, 3)  # image sets: crops
    where = f"not found in data.dir={data_dir!r}" if data_dir else "data.dir is not set"
    print(f"bench: the {name} files are absent ({where}); timing synthetic data of the same shape instead: "
          f"{'x'.join(map(str, shape))} images, {cfg.model.num_classes} classes")
    return data.DatasetInfo(name="synthetic", image_shape=tuple(shape), num_classes=cfg.model.num_classes,
                            split_sizes={}, mean=(0.0,) * shape[-1], std=(1.0,) * shape[-1])


def bench_step(cfg, devices: int, backend: str, steps: int, info=None) -> StepRow:
    """Times the train step of ``cfg`` on the first ``devices`` devices, per-device batch held constant.
    ``info``: the data set's facts (default: ``data_info(cfg)``); only its image shape is used."""
    import numpy as np

    from fastgpu_jax import nn, parallel, steps as steps_lib
    from fastgpu_jax.builders import build_state

    strategy_name = cfg.parallel.strategy if devices > 1 or cfg.parallel.strategy == "none" else "none"
    if devices > 1 and strategy_name == "none":
        strategy_name = "dp"
    mesh = parallel.make_mesh("", devices=jax.devices()[:devices],
                              default_axis="fsdp" if strategy_name == "fsdp" else "data")
    global_batch = cfg.data.batch_size * devices
    strategy = parallel.get_strategy(strategy_name, mesh, batch_size=global_batch)
    info = info or data_info(cfg)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(global_batch,) + tuple(info.image_shape)).astype(np.float32),
             "label": rng.integers(0, cfg.model.num_classes, global_batch).astype(np.int32)}
    host_state = build_state(cfg, info, axis_name=strategy.axis_name)
    with nn.default_backend("xla"):  # model FLOPs, whatever backend runs them (interpret-mode Pallas is opaque)
        # One device runs strategy none (no mapped BatchNorm axis), so its state lowers as it is.
        flops = xla_step_flops(host_state, batch) if devices == 1 else None
    with nn.default_backend(backend, pallas_lowering=cfg.model.pallas_lowering):
        state = strategy.place_state(host_state)
        placed = strategy.place_batch(batch, is_global=True)
        fn = strategy.compile_train(steps_lib.train_step)
        print(f"bench: compiling the {cfg.model.name} train step ({devices} device(s), {strategy_name}, backend "
              f"{backend}, batch {global_batch}) ...", end=" ", flush=True)
        start = time.perf_counter()
        state, metrics = fn(state, placed)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - start
        print(f"{first:.1f} s; timing {steps} steps", flush=True)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = fn(state, placed)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    return StepRow(devices, strategy_name, backend, global_batch, max(first - step_s, 0.0), step_s, flops,
                   _peak_bytes())


def format_step_table(rows: list[StepRow]) -> str:
    head = (f"{'devices':>7} {'strategy':>8} {'backend':>7} {'batch':>6} {'compile s':>9} {'step ms':>9} "
            f"{'examples/s':>11} {'scaling':>7} {'GFLOP/step':>10} {'MFU':>6} {'peak MiB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else "   n/a"
        flops = f"{r.flops / 1e9:10.2f}" if r.flops else f"{'n/a':>10}"
        mem = f"{r.peak_bytes / 2**20:8.0f}" if r.peak_bytes else f"{'n/a':>8}"
        lines.append(f"{r.devices:>7} {r.strategy:>8} {r.backend:>7} {r.global_batch:>6} {r.compile_s:>9.2f} "
                     f"{1000 * r.step_s:>9.2f} {r.examples_per_s:>11,.0f} {r.efficiency:>7.2f} {flops} {mfu} {mem}")
    return "\n".join(lines)


def run_model_benchmark(cfg, *, device_counts: tuple[int, ...] | None = None,
                        backends: tuple[str, ...] = ("xla",), steps: int = 10,
                        json_path: str | None = None) -> list[StepRow]:
    """Step time, examples/s and scaling efficiency (examples/s at n devices / (n x at 1 device)) for each
    device count and op backend; weak scaling: ``data.batch_size`` is the per-device batch here."""
    available = jax.device_count()
    counts = device_counts or tuple(n for n in (1, 2, 4, 8, 16) if n <= available)
    if max(counts) > available:
        raise ValueError(f"bench asked for {max(counts)} devices but {available} are available")
    from fastgpu_jax.builders import apply_kernel_tuning

    apply_kernel_tuning(cfg)  # model.pallas_tuning: blocks and measured flags, as train and evaluate load them
    info = data_info(cfg)
    shape = tuple(info.image_shape)
    rows = []
    for op_backend in backends:
        base = None
        for n in counts:
            row = bench_step(cfg, n, op_backend, steps, info)
            base = base or (row if n == 1 else None)
            row.efficiency = row.examples_per_s / (n * base.examples_per_s) if base else float("nan")
            rows.append(row)
    source = cfg.data.name if info.name == cfg.data.name else "synthetic"
    print(f"device: {jax.devices()[0].device_kind} ({tuning.device_kind()}), jax {jax.__version__}, "
          f"{cfg.model.name} on {source} {shape}, precision "
          f"{cfg.train.precision}, per-device batch {cfg.data.batch_size}, median of {steps} steps")
    if any(b != "xla" for b in backends):
        print(f"pallas lowering {lowering.describe(tuning.device_kind(), cfg.model.pallas_lowering)}")
    print(format_step_table(rows))
    from fastgpu_jax.builders import build_model

    analytic = analytic_step_flops(build_model(cfg), (cfg.data.batch_size,) + shape)
    xla = next((r.flops for r in rows if r.flops), None)
    if xla:
        print(f"FLOPs per step (per-device batch): XLA {xla / 1e9:.2f} G, analytic {analytic / 1e9:.2f} G "
              f"(XLA / analytic = {xla / analytic:.3f})")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                       "analytic_flops": analytic, "rows": [r.as_dict() for r in rows]}, f, indent=2)
    return rows
