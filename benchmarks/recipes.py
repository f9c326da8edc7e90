"""What each research recipe changes on the default digits run: test accuracy and loss with and without it.

    python benchmarks/recipes.py [--seeds 0,1] [--steps 400] [--only NAME,NAME]

Trains ``configs/digits_cnn.py`` once per (recipe, seed) in a temporary workdir and prints a table; the EMA rows
evaluate the EMA weights (``eval``'s default when a run has one). Digits is tiny (1,257 training images of 8x8): it
shows that each recipe runs end to end and in which direction it moves a small CNN, not what it does for ImageNet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastgpu_jax as fg  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {
    "baseline": [],
    "label_smoothing=0.1": ["train.label_smoothing=0.1"],
    "mixup=0.2": ["data.mixup_alpha=0.2"],
    "cutmix=1.0": ["data.cutmix_alpha=1.0"],
    "mixup+cutmix": ["data.mixup_alpha=0.2", "data.cutmix_alpha=1.0"],
    "ema=0.99": ["train.ema_decay=0.99"],
    "lion lr=3e-4": ["optimizer.name=lion", "optimizer.lr=3e-4"],
    "step schedule": ["optimizer.schedule=step", "optimizer.step_boundaries=0.5,0.75"],
}


def run(overrides: list[str], seed: int, steps: int) -> dict:
    base = [f"seed={seed}", f"train.steps={steps}", f"train.checkpoint_every_steps={steps}", "log.tensorboard=False",
            "log.progress_bar=False", f"train.log_every_steps={steps}"]
    with tempfile.TemporaryDirectory() as tmp:
        fg.train(fg.load_config(os.path.join(ROOT, "configs", "digits_cnn.py"), base + overrides), tmp)
        return fg.evaluate(tmp, "test")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--only", default="", help="comma list of recipe names (default: all)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in RECIPES if not args.only or n in args.only.split(",")]
    print(f"| recipe | test accuracy (seeds {args.seeds}) | mean | test loss mean |")
    print("|---|---|---|---|")
    for name in names:
        results = [run(RECIPES[name], seed, args.steps) for seed in seeds]
        accs = [r["accuracy"] for r in results]
        print(f"| {name} | {' / '.join(f'{a:.4f}' for a in accs)} | {statistics.mean(accs):.4f} | "
              f"{statistics.mean(r['loss'] for r in results):.4f} |", flush=True)


if __name__ == "__main__":
    main()
