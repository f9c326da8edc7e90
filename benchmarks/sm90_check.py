"""Offline Hopper check of every Pallas kernel: compiled for an H100 (sm_90a) on a CPU machine, no GPU needed.

Lowering a kernel "for CUDA" on CPU proves only that Pallas emits Triton IR. This script also runs Triton's
compiler and ptxas on that IR, so it sees what only a GPU compile shows: shared memory per block (an H100
block gets 227 KB), registers and spill bytes, whether the dots became wgmma (Hopper's tensor-core
instruction) or mma.sync, cp.async pipelining, the grid (an H100 has 132 SMs), the compile time, and, from
the kernels' own bookkeeping, the share of multiply-adds spent on block padding.

Two steps, because the second needs the ``triton`` package (3.6.0, the release paired with jax 0.11 on
the GPU machine), which is not a dependency of this project:

    # 1. in the project's environment: capture the Triton IR, with the H100 rows of the tuning table
    python benchmarks/sm90_check.py capture OUT [--what table,resnet50,vit_b16] [--batch 256]
    # 2. in an environment with triton (python -m venv tv && tv/bin/pip install triton==3.6.0):
    tv/bin/python benchmarks/sm90_check.py compile OUT [--json OUT/report.json]

``capture`` writes OUT/<what>/ (one .ttir per launch plus index.json). ``table`` lowers every H100 entry of
``tuning.TABLE`` (forward and backward, in the entry's dtype) on shapes that use the full blocks; the model
sets (``resnet50``, ``vit_b16``; ``*_f32`` for float32 models) lower the forward and backward of the model's
loss at the given batch, bf16, ``model.backend=pallas``.
``compile`` prints one row per launch and a summary per set against the targets: fits an H100, zero spills
in the main-loop kernels, >= 132 programs, wgmma, compile < 60 s, padding <= 15% of the MACs. It exits 1 if a
kernel does not fit. Results are in BENCHMARKS.md ("Offline Hopper check").
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import time

H100_SMEM = 227 * 1024
H100_SMS = 132
MAX_COMPILE_S = 60
MAX_PADDING = 0.15
MAIN_LOOP = ("matmul_fwd", "matmul_grad_a", "matmul_grad_b", "conv2d_fwd", "conv2d_wgrad")


# --- step 1: capture (project environment) ----------------------------------------------------------------

def _capture_set(out_dir: str, build) -> None:
    """Lowers ``build()`` -> (fn, args) for CUDA, writing each Triton kernel's IR and launch facts."""
    import jax
    from jax._src.pallas.triton import lowering as tl, pallas_call_registration as reg

    from fastgpu_jax.pallas_kernels import lowering, tuning

    os.makedirs(out_dir, exist_ok=True)
    index, last = [], {}
    orig_lower, orig_call = tl.lower_jaxpr_to_triton_module, reg.mlir.custom_call

    def lower(*args, **kwargs):
        res = orig_lower(*args, **kwargs)
        last["asm"] = res.module.operation.get_asm(enable_debug_info=False)
        return res

    def custom_call(call_target_name, *args, **kwargs):
        target = call_target_name
        cfg = kwargs.get("backend_config")
        if target == "__gpu$xla.gpu.triton" and isinstance(cfg, dict) and "asm" in last:
            val = lambda k: int(cfg[k].value)  # noqa: E731
            name = str(cfg["name"].value)
            entry = dict(file=f"{len(index):03d}_{name}.ttir", kernel=name, warps=val("num_warps"),
                         stages=val("num_stages"), grid=[val("grid_x"), val("grid_y"), val("grid_z")])
            with open(os.path.join(out_dir, entry["file"]), "w") as f:
                f.write(last.pop("asm"))
            index.append(entry)
        return orig_call(call_target_name, *args, **kwargs)

    tl.lower_jaxpr_to_triton_module, reg.mlir.custom_call = lower, custom_call
    try:
        # The Triton bodies (this check compiles Triton IR): on an H100 `auto` gives matmul and conv to Mosaic GPU,
        # whose lowering tests/test_matmul_mgpu.py and tests/test_conv_mgpu.py check instead.
        with tuning.use_device_kind("H100"), lowering.lower_for_gpu(), lowering.use_lowering("triton"), \
                lowering.record_launches() as launches:
            fn, args = build()
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        tl.lower_jaxpr_to_triton_module, reg.mlir.custom_call = orig_lower, orig_call
    pending = list(launches)
    for entry in index:  # launches pruned by XLA (an unused input gradient) have no IR: match in order
        hit = next((r for r in pending if r["name"] == entry["kernel"] and
                    r["grid"] + [1] * (3 - len(r["grid"])) == entry["grid"]), None)
        if hit:
            pending.remove(hit)
            entry["macs"] = hit["macs"]
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    print(f"captured {len(index)} kernel launches in {out_dir}")


def _table_set():
    """Every H100 tuning entry, forward + backward, on shapes that fill its blocks (odd edges included)."""
    import jax
    import jax.numpy as jnp

    from fastgpu_jax.pallas_kernels import conv2d, matmul, tuning

    calls = []
    for (kind, op, _, dt), b in sorted(tuning.TABLE.items()):
        if kind != "H100" or op.endswith("_mgpu"):  # Mosaic rows: not Triton IR
            continue
        dtype = jnp.dtype(dt)
        if op == "matmul":
            m, k, n = 24 * b.block_m + 5, 8 * b.block_k, 6 * b.block_n - 3
            calls.append((lambda a, w, bias, b=b: matmul(a, w, bias, "gelu", blocks=b),
                          [(m, k), (k, n), (n,)], dtype))
        else:
            cin, cout = 2 * b.block_k, 2 * b.block_n
            calls.append((lambda x, w, b=b: conv2d(x, w, strides=(1, 1), padding="SAME", blocks=b),
                          [(64, 28, 28, cin), (3, 3, cin, cout)], dtype))
            calls.append((lambda x, w, b=b: conv2d(x, w, strides=(2, 2), padding="SAME", blocks=b),
                          [(128, 56, 56, cin), (3, 3, cin, cout)], dtype))

    def fn(*flat):
        out, i = [], 0
        for f, shapes, _ in calls:
            args = flat[i:i + len(shapes)]
            i += len(shapes)
            y, vjp = jax.vjp(f, *args)
            out.append(vjp(y))
        return out

    args = [jax.ShapeDtypeStruct(s, dtype) for _, shapes, dtype in calls for s in shapes]
    return fn, args


def _model_set(name: str, batch: int, dtype: str = "bfloat16"):
    """The forward and backward of the model's cross-entropy loss: the kernels of its train step."""
    import jax
    import jax.numpy as jnp
    import optax

    from fastgpu_jax import models
    from fastgpu_jax.nn import backend

    model = models.build(name, num_classes=1000, dtype=jnp.dtype(dtype))
    x = jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 224, 224, 3))))
    stats = variables.get("batch_stats", {})

    def loss(params, stats, x, labels):
        with backend.use_backend("pallas"):
            if not stats:
                logits = model.apply({"params": params}, x)
            else:
                logits, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                        mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()

    return jax.grad(loss), [variables["params"], stats, x, labels]


def capture(out: str, what: list[str], batch: int) -> None:
    builders = {"table": _table_set}
    for model in ("resnet50", "vit_b16"):
        builders[model] = functools.partial(_model_set, model, batch)
        builders[model + "_f32"] = functools.partial(_model_set, model, batch, "float32")
    for w in what:
        _capture_set(os.path.join(out, w), builders[w])


# --- step 2: compile (an environment with triton) ---------------------------------------------------------

def _compile_one(path: str, warps: int, stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    try:
        k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    except Exception as e:  # noqa: BLE001 - a config Triton refuses is a finding, not a crash
        return dict(ok=False, error=(str(e) or repr(e)).strip().splitlines()[-1][:200])
    seconds = time.perf_counter() - start
    ptx = k.asm["ptx"]
    with open(path + ".ptx", "w") as f:
        f.write(ptx)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    info = subprocess.run([ptxas, "-arch=sm_90a", "-v", path + ".ptx", "-o", os.devnull],
                          capture_output=True, text=True).stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, info)) else 0  # noqa: E731
    return dict(ok=True, seconds=round(seconds, 1), smem=k.metadata.shared, regs=num(r"Used (\d+) registers"),
                spill=num(r"(\d+) bytes spill stores"), wgmma=ptx.count("wgmma.mma_async"),
                mma_sync=ptx.count("mma.sync"), cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"))


def _compile_isolated(path: str, warps: int, stages: int) -> dict:
    """``_compile_one`` in a child process with a time limit: a kernel Triton cannot finish is a finding."""
    try:
        res = subprocess.run([sys.executable, __file__, "_one", path, str(warps), str(stages)],
                             capture_output=True, text=True, timeout=3 * MAX_COMPILE_S)
    except subprocess.TimeoutExpired:
        return dict(ok=False, error=f"Triton compile took over {3 * MAX_COMPILE_S} s")
    lines = res.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else dict(ok=False, error=res.stderr.strip()[-200:])


def _problems(r: dict) -> list[str]:
    if not r["ok"]:
        return ["does not compile: " + r["error"]]
    out = []
    if r["smem"] > H100_SMEM:
        out.append(f"smem {r['smem'] // 1024} KB > 227")
    if r["spill"] and r["kernel"] in MAIN_LOOP:
        out.append("spills")
    if r["programs"] < H100_SMS:
        out.append(f"{r['programs']} programs")
    if not r["wgmma"]:
        out.append("no wgmma")
    if r["seconds"] > MAX_COMPILE_S:
        out.append(f"compile {r['seconds']} s")
    if r.get("padding", 0) > MAX_PADDING:
        out.append(f"padding {r['padding']:.0%}")
    return out


def compile_sets(out: str, json_path: str | None) -> int:
    sets = [d for d in sorted(os.listdir(out)) if os.path.exists(os.path.join(out, d, "index.json"))]
    report, no_fit = {}, 0
    for s in sets:
        d = os.path.join(out, s)
        rows, cache = [], {}
        print(f"\n== {s}\n{'kernel':14} {'grid':>12} {'w':>2} {'s':>2} {'smem KB':>7} {'regs':>4} {'spill':>5} "
              f"{'wgmma':>5} {'mma.sync':>8} {'cp.async':>8} {'pad':>5} {'sec':>5}  problems")
        for e in json.load(open(os.path.join(d, "index.json"))):
            path = os.path.join(d, e["file"])
            key = (hashlib.sha1(open(path, "rb").read()).hexdigest(), e["warps"], e["stages"])
            if key not in cache:  # repeated layers lower to the same kernel: compile it once
                cache[key] = _compile_isolated(path, e["warps"], e["stages"])
            r = dict(e, **cache[key], programs=e["grid"][0] * e["grid"][1] * e["grid"][2])
            if e.get("macs"):
                r["padding"] = 1 - e["macs"][0] / e["macs"][1]
            r["problems"] = _problems(r)
            no_fit += (not r["ok"]) or r["smem"] > H100_SMEM
            rows.append(r)
            grid = "x".join(map(str, e["grid"]))
            if r["ok"]:
                pad = f"{r['padding']:.0%}" if "padding" in r else "-"
                print(f"{e['kernel'][:14]:14} {grid:>12} {e['warps']:>2} {e['stages']:>2} {r['smem'] / 1024:7.1f} "
                      f"{r['regs']:>4} {r['spill']:>5} {r['wgmma']:>5} {r['mma_sync']:>8} {r['cp_async']:>8} "
                      f"{pad:>5} {r['seconds']:>5}  {', '.join(r['problems'])}")
            else:
                print(f"{e['kernel'][:14]:14} {grid:>12} {e['warps']:>2} {e['stages']:>2}  {r['problems'][0]}")
        report[s] = rows
        _summary(s, rows, len(cache))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if no_fit else 0


def _summary(name: str, rows: list[dict], distinct: int) -> None:
    ok = [r for r in rows if r["ok"]]
    count = lambda pred: sum(1 for r in rows if pred(r))  # noqa: E731
    print(f"-- {name}: {len(rows)} launches ({distinct} distinct); "
          f"do not fit or compile: {count(lambda r: not r['ok'] or r['smem'] > H100_SMEM)}; "
          f"main-loop kernels that spill: {count(lambda r: r['ok'] and r['spill'] and r['kernel'] in MAIN_LOOP)}; "
          f"< {H100_SMS} programs: {count(lambda r: r['programs'] < H100_SMS)}; "
          f"no wgmma: {count(lambda r: r['ok'] and not r['wgmma'])}; "
          f"padding > {MAX_PADDING:.0%}: {count(lambda r: r.get('padding', 0) > MAX_PADDING)}; "
          f"slowest compile {max((r['seconds'] for r in ok), default=0)} s; "
          f"max registers {max((r['regs'] for r in ok), default=0)}")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "_one":
        print(json.dumps(_compile_one(argv[1], int(argv[2]), int(argv[3]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("out")
    c.add_argument("--what", default="table,resnet50,vit_b16,resnet50_f32,vit_b16_f32")
    c.add_argument("--batch", type=int, default=256)
    k = sub.add_parser("compile")
    k.add_argument("out")
    k.add_argument("--json")
    a = p.parse_args(argv)
    if a.cmd == "capture":
        capture(a.out, a.what.split(","), a.batch)
        return 0
    return compile_sets(a.out, a.json)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
