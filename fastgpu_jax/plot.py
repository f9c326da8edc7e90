"""``curves.png``: loss and accuracy against step, train vs eval, from ``metrics.jsonl``."""

from __future__ import annotations

import os

from fastgpu_jax.writers import read_metrics


def plot_curves(workdir: str, output: str | None = None) -> str:
    """Writes the curves of the run in ``workdir`` to ``output`` (default ``workdir/curves.png``)."""
    import matplotlib  # lazy: only this command needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    if not rows:
        raise FileNotFoundError(f"{os.path.join(workdir, 'metrics.jsonl')} is missing or empty: train first")
    output = output or os.path.join(workdir, "curves.png")
    splits = sorted({r["split"] for r in rows}, key=lambda s: (s != "train", s))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for split in splits:
            pts = [(r["step"], r[key]) for r in rows if r["split"] == split and r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=split)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(os.path.basename(os.path.normpath(workdir)))
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
