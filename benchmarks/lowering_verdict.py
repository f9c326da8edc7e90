"""Which Pallas lowering ``auto`` should take, and where Pallas beats XLA, from two GPU kernel sweeps.

    python benchmarks/lowering_verdict.py SWEEP_TRITON.json SWEEP_MOSAIC.json [--write TABLE.json]

The sweeps are ``fastgpu-jax bench --kernels --lowering triton|mosaic --json ...`` on one GPU at full size
(``benchmarks/gpu_suite.sh`` writes both, then runs this). Prints, per (kernel, shape class), each lowering's
geometric-mean speed relative to XLA over the shapes both sweeps timed. ``--write`` saves the verdicts as a
tuning table (``tuning.load_table`` format: ``triton_faster_than_mosaic`` and ``faster_than_xla`` rows) that a
run loads with ``--config.model.pallas_tuning=TABLE.json``; copy lasting results into ``tuning.py``'s
``TRITON_FASTER_THAN_MOSAIC`` / ``FASTER_THAN_XLA`` with the BENCHMARKS.md entry that measured them.
"""

from __future__ import annotations

import argparse
import json

from fastgpu_jax.bench import lowering_verdicts


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def format_verdicts(rows: list[dict]) -> str:
    head = f"{'kind':<6} {'kernel':<7} {'class':<7} {'rows':>4} {'Triton/XLA':>10} {'Mosaic/XLA':>10}  auto takes"
    lines = [head, "-" * len(head)]
    for r in rows:
        best = "Triton" if r["triton_faster"] else "Mosaic"
        verdict = f"{best} Pallas" if r["faster_than_xla"] else f"XLA (Pallas best: {best})"
        wrong = [name for name in ("triton", "mosaic") if r.get(f"{name}_wrong")]
        verdict += f"; WRONG output: {', '.join(wrong)}" if wrong else ""
        lines.append(f"{r['kind']:<6} {r['op']:<7} {r['shape_class']:<7} {r['rows']:>4} {r['triton_vs_xla']:>10.2f} "
                     f"{r['mosaic_vs_xla']:>10.2f}  {verdict}")
    return "\n".join(lines)


def table(rows: list[dict]) -> dict:
    """The verdicts as a tuning table (``tuning.load_table``)."""
    def flags(field):
        return [dict(kind=r["kind"], op=r["op"], shape_class=r["shape_class"], faster=r[field]) for r in rows]
    return {"triton_faster_than_mosaic": flags("triton_faster"), "faster_than_xla": flags("faster_than_xla")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("triton", help="kernel sweep JSON with --lowering triton")
    parser.add_argument("mosaic", help="kernel sweep JSON with --lowering mosaic")
    parser.add_argument("--write", help="save the verdicts as a tuning table (JSON) for model.pallas_tuning")
    args = parser.parse_args(argv)
    rows = lowering_verdicts(_load(args.triton), _load(args.mosaic))
    print(format_verdicts(rows))
    if args.write:
        with open(args.write, "w") as f:
            json.dump(table(rows), f, indent=2)
        print(f"wrote {args.write} (load with --config.model.pallas_tuning={args.write})")


if __name__ == "__main__":
    main()
