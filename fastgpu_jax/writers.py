"""Where metrics go: console lines + progress bar, ``metrics.jsonl``, TensorBoard events, and optionally
Weights & Biases (``log.wandb``).

Every row is ``{"step", "split", ...metrics}``; ``split`` is train, val or test. On resume,
``truncate_after(step)`` drops rows past the restored step so the file ends up exactly as an uninterrupted
run's would (timing fields aside); the rows it drops are kept in ``metrics.jsonl.N.bak``. Rows are strict
JSON: a non-finite value is written as null and named in ``nonfinite_values``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from typing import Any

# Fields that measure the machine rather than the run; they differ between identical runs.
TIMING_KEYS = ("ms_per_step", "examples_per_s", "eval_seconds")


def read_metrics(workdir: str) -> list[dict]:
    """All rows of ``workdir/metrics.jsonl`` (empty list if there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed process: not a finished row
                continue
    return rows


def json_row(row: dict) -> dict:
    """The row as strict JSON: non-finite floats become null and are named in ``nonfinite_values``
    (a bare ``NaN``/``Infinity`` is not JSON, and most readers reject the whole file)."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return row
    return {**{k: (None if k in bad else v) for k, v in row.items()}, "nonfinite_values": bad}


def _fmt(name: str, value: Any) -> str:
    if isinstance(value, float):
        if name == "lr":
            return f"{name} {value:.2e}"
        if name == "ms_per_step":
            return f"{value:.1f} ms/step"
        if name == "examples_per_s":
            return f"{value:,.0f} ex/s"
        return f"{name} {value:.4f}"
    return f"{name} {value}"


def _start_wandb(workdir: str, project: str, run_config: dict):
    """A W&B run for this workdir (lazy import; resumes the same run id when training resumes).
    ``WANDB_MODE=offline`` logs to ``workdir/wandb`` without network; ``wandb sync`` uploads later."""
    try:
        import wandb
    except ImportError as err:
        raise ImportError("log.wandb=True needs the wandb package: pip install 'fastgpu_jax[wandb]'") from err
    id_file = os.path.join(workdir, "wandb_run_id")
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = wandb.util.generate_id()
        with open(id_file, "w") as f:
            f.write(run_id)
    return wandb.init(project=project, dir=workdir, id=run_id, resume="allow", config=run_config,
                      name=os.path.basename(os.path.normpath(workdir)))


class MetricWriter:
    """Writes rows to console, JSONL and (optionally) TensorBoard. ``enabled=False`` writes nothing
    (processes other than 0 in multi-host runs)."""

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, tensorboard: bool = True,
                 progress_bar: bool = True, enabled: bool = True, wandb_project: str | None = None,
                 run_config: dict | None = None):
        self.workdir, self.total_steps, self.enabled = workdir, total_steps, enabled
        self._tb = self._bar = self._wandb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if wandb_project:
            self._wandb = _start_wandb(workdir, wandb_project, run_config or {})
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazy: heavy import

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def truncate_after(self, step: int) -> None:
        """Keeps only rows with ``step <= step`` (called once the restored step is known). Rows that are cut
        are not lost: the whole previous file is kept as ``metrics.jsonl.N.bak`` first."""
        if not self.enabled:
            return
        rows = read_metrics(self.workdir)
        kept = [r for r in rows if r["step"] <= step]
        if len(kept) < len(rows):
            self._backup()
        self._rewrite(kept)

    def _backup(self) -> str:
        path = os.path.join(self.workdir, "metrics.jsonl")
        n = 1
        while os.path.exists(f"{path}.{n}.bak"):
            n += 1
        shutil.copyfile(path, f"{path}.{n}.bak")
        return f"{path}.{n}.bak"

    def _rewrite(self, rows: list[dict]) -> None:
        path = os.path.join(self.workdir, "metrics.jsonl")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)
        os.replace(tmp, path)

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split}
        row.update({k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in metrics.items()})
        with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(json_row(row), allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in row.items() if k not in ("step", "split")
                             and isinstance(v, (int, float))}, step=int(step))
        parts = [f"{split:5s} step {step}/{self.total_steps}"]
        parts += [_fmt(k, v) for k, v in row.items() if k not in ("step", "split")]
        self.print("  ".join(parts))

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def progress(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)  # tqdm rate-limits the redraw

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
