"""Fixed start-up costs of the command line, each split into import / restore / compile / run. Prints a table.

    python benchmarks/startup.py [--repo DIR] [--repeat 3]

Commands timed, in this order, on a fresh workdir: ``--help``, ``train`` of the default config
(configs/digits_cnn.py), ``eval``, ``predict`` on 8 images, and a no-op resume of the finished run.
``--repo`` times another checkout (e.g. an older commit via ``git worktree add``) with this same script, so a
before/after table compares like with like. Each row is the median of ``--repeat`` runs (train is run once per
repeat, each in its own workdir).

How a command's wall time is split, without touching the library: every command runs in a child interpreter
that wraps ``__import__``/``importlib.import_module`` (import: time spent in outermost imports), listens to
``jax.monitoring`` compile events (compile: tracing, lowering and XLA compilation, wherever they happen), and
wraps ``Checkpointer.restore_latest`` (restore: minus compiles inside it). ``run`` is the rest of the child's
time; ``python`` is interpreter start-up and exit (the parent's wall time minus the child's).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

_CHILD = r"""
import builtins, importlib, json, sys, time
t_start = time.perf_counter()
times = {"import": 0.0, "compile": 0.0, "restore": 0.0}
depth = [0]

def timed(fn):
    def wrapper(*a, **k):
        if depth[0]:
            return fn(*a, **k)
        depth[0] += 1
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            times["import"] += time.perf_counter() - t
            depth[0] -= 1
    return wrapper

builtins.__import__ = timed(builtins.__import__)
importlib.import_module = timed(importlib.import_module)
_COMPILE_EVENTS = ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration")

class Hook:  # registers the compile listener as soon as jax is imported, without importing it earlier
    def find_spec(self, name, path=None, target=None):
        if name == "jax.monitoring" and not getattr(self, "done", False):
            self.done = True
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            loader = spec.loader
            exec_module = loader.exec_module
            def exec_and_listen(module):
                exec_module(module)
                module.register_event_duration_secs_listener(
                    lambda n, secs, **kw: times.__setitem__("compile", times["compile"] + secs)
                    if n.endswith(_COMPILE_EVENTS) else None)
            loader.exec_module = exec_and_listen
            return spec
        return None

import importlib.util
sys.meta_path.insert(0, Hook())

def patch_restore():
    from fastgpu_jax import checkpoint
    original = checkpoint.Checkpointer.restore_latest
    def restore_latest(self, *a, **k):
        t, c = time.perf_counter(), times["compile"]
        try:
            return original(self, *a, **k)
        finally:
            times["restore"] += (time.perf_counter() - t) - (times["compile"] - c)
    checkpoint.Checkpointer.restore_latest = restore_latest

from fastgpu_jax import cli
argv = json.loads(sys.argv[1])
if argv[0] != "--help":  # every other command imports the checkpoint module (and JAX) anyway
    patch_restore()
code = 0
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code or 0
times["total"] = time.perf_counter() - t_start
sys.stderr.write("STARTUP-TIMES " + json.dumps(times) + "\n")
sys.exit(code)
"""


def _child(repo: str, argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(argv)], cwd=repo, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [x for x in proc.stderr.splitlines() if x.startswith("STARTUP-TIMES ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    t = json.loads(lines[-1][len("STARTUP-TIMES "):])
    t["run"] = t["total"] - t["import"] - t["compile"] - t["restore"]
    t["python"] = wall - t["total"]
    t["wall"] = wall
    return t


def _commands(workdir: str, images: str) -> list[tuple[str, list[str]]]:
    config = os.path.join("configs", "digits_cnn.py")
    quiet = ["--config.log.progress_bar=False"]
    return [("--help", ["--help"]),
            ("train (default config)", ["train", "--config", config, "--workdir", workdir] + quiet),
            ("eval", ["eval", "--workdir", workdir]),
            ("predict (8 images)", ["predict", "--workdir", workdir, "--input", images]),
            ("no-op resume", ["train", "--config", config, "--workdir", workdir] + quiet)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    repo = os.path.abspath(args.repo)
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = os.path.join(tmp, "images.npy")
        np.save(images, np.random.default_rng(0).uniform(0, 16, (8, 8, 8)).astype(np.float32))
        for r in range(args.repeat):
            for name, argv in _commands(os.path.join(tmp, f"run{r}"), images):
                rows.setdefault(name, []).append(_child(repo, argv))
                print(f"  {name}: {rows[name][-1]['wall']:.2f} s", file=sys.stderr)
    cols = ("wall", "python", "import", "restore", "compile", "run")
    print(f"startup costs, seconds (median of {args.repeat}), repo {os.path.basename(repo)}, {os.cpu_count()} CPUs")
    print(f"| command | {' | '.join(cols)} |")
    print("|---" * (len(cols) + 1) + "|")
    for name, runs in rows.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(r[c] for r in runs):.2f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
