"""The Mosaic GPU kernels' targets against their goals, from one GPU suite's results.

    python benchmarks/mosaic_targets.py OUT

OUT is a ``benchmarks/gpu_suite.sh`` folder: its ``kernel_sweep_{mosaic,triton}.json`` (ResNet-50's convs, three
passes each, and the square matmuls) and ``roofline_vit_b16_{mosaic,triton}.json`` (ViT-B/16's train-step passes).
Each JSON says which lowering ran it; a run that is missing leaves its rows "not measured". Goals (one H100,
bf16): the Mosaic matmul >= 1.05x XLA (geometric mean) on the two models' train-step passes and >= 1.0x at
4096^3 and 8192^3; the Mosaic conv >= the Triton conv.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from fastgpu_jax.bench import WRONG, mosaic_targets


def load(out_dir: str) -> tuple[dict, dict, list[str]]:
    """(sweeps, rooflines) of ``bench.mosaic_targets``, keyed by the lowering each JSON records, and a line per
    run that was stopped before its end or has shapes that failed."""
    rooflines: dict[str, list[dict]] = {}
    sweeps: dict[str, dict] = {}
    notes: list[str] = []
    for path in sorted(glob.glob(os.path.join(out_dir, "roofline_*.json")) +
                       glob.glob(os.path.join(out_dir, "kernel_sweep_*.json"))):
        with open(path) as f:
            run = json.load(f)
        if "lowering" not in run:
            raise ValueError(f"{path}: no 'lowering' field (written by a bench older than this script); rerun it")
        low = run["lowering"].split(":")[0]
        wrong = [r.get("name", r.get("layer")) for r in run["rows"] if r.get("error", 0) > WRONG]
        if wrong:
            notes.append(f"{os.path.basename(path)}: WRONG output (error vs XLA > {WRONG}) on {wrong}")
        if run.get("tiny"):
            notes.append(f"{os.path.basename(path)}: tiny shapes (not speed figures)")
        if not run.get("complete", True) or run.get("errors"):
            notes.append(f"{os.path.basename(path)}: {'stopped early, ' if not run.get('complete', True) else ''}"
                         f"{len(run['rows'])} rows, failed: {[e['what'] for e in run.get('errors', [])]}")
        if "model" in run:
            rooflines.setdefault(low, []).append(run)
        else:
            sweeps[low] = run
    return sweeps, rooflines, notes


def format_targets(rows: list[dict]) -> str:
    head = f"{'target':<62} {'passes':>6} {'measured':>8} {'goal':>6}  met"
    lines = [head, "-" * len(head)]
    for r in rows:
        measured = "-" if r["measured"] is None else f"{r['measured']:.2f}x"
        goal = "" if r["goal"] is None else f">={r['goal']:.2f}"
        met = "" if r["goal"] is None or r["measured"] is None else ("yes" if r["measured"] >= r["goal"] else "NO")
        lines.append(f"{r['what']:<62} {r['shapes']:>6} {measured:>8} {goal:>6}  {met}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="a gpu_suite.sh results folder")
    args = parser.parse_args(argv)
    sweeps, rooflines, notes = load(args.out)
    print(format_targets(mosaic_targets(sweeps, rooflines)))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
