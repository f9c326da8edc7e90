"""Is the input pipeline or the device the bottleneck? ``fastgpu-jax bench --data --config C [--workers 0,1,2,4]``.

For each worker count it times the config's own train pipeline (same data set, transforms and batch size as
training: decode, crop, resize, flip, uint8 batches) after a warm-up batch (worker start-up is excluded and
printed apart) and after the batches the workers prefetched meanwhile (so the table shows the steady rate), and
prints decoded images/s, images/s per decoding core, and, next to it, the images/s that the config's train step
consumes on this device (the model benchmark's step time for the same batch). A pipeline
slower than the step starves the device: raise ``data.workers`` (or convert to ArrayRecord with a smaller
``--resize-short``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time


@dataclasses.dataclass
class PipelineRow:
    workers: int
    batches: int
    images: int
    startup_s: float
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def per_core(self) -> float:
        """Images/s per decoding core: workers=0 decodes on one thread of this process."""
        return self.images_per_s / max(self.workers, 1)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "images_per_s": self.images_per_s, "per_core": self.per_core}


def time_pipeline(cfg, workers: int, batches: int) -> PipelineRow:
    """Images/s of ``cfg``'s train pipeline with ``workers`` decoding processes over ``batches`` batches."""
    from fastgpu_jax import data
    from fastgpu_jax.builders import data_kwargs, loader_kwargs

    d = cfg.data
    kw = {**loader_kwargs(cfg), "workers": workers}
    start = time.perf_counter()
    it = data.train_iterator(d.name, batch_size=d.batch_size, seed=cfg.seed, data_dir=d.dir, augment=d.augment,
                             **data_kwargs(cfg), **kw)
    try:
        next(it)  # worker start-up and the first batch
        startup = time.perf_counter() - start
        for _ in range(workers * d.prefetch):  # batches the workers made ahead while we waited: not timed
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - start
    finally:
        it.close()
    return PipelineRow(workers, batches, batches * d.batch_size, startup, seconds)


def format_table(rows: list[PipelineRow], step_images_per_s: float | None) -> str:
    head = f"{'workers':>7} {'images/s':>10} {'per core':>9} {'start s':>8} {'vs step':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r.images_per_s / step_images_per_s:8.2f}" if step_images_per_s else f"{'n/a':>8}"
        lines.append(f"{r.workers:>7} {r.images_per_s:>10,.0f} {r.per_core:>9,.0f} {r.startup_s:>8.2f} {ratio}")
    return "\n".join(lines)


def run_data_benchmark(cfg, *, workers: tuple[int, ...] = (0, 1, 2), batches: int = 10, step: bool = True,
                       json_path: str | None = None) -> dict:
    """Prints and returns the pipeline table and the train step's consumption (``step=False`` skips it)."""
    from fastgpu_jax import data

    if cfg.data.name not in data.IMAGE_DATASETS:
        raise ValueError(f"bench --data measures decoding pipelines: data.name must be one of "
                         f"{', '.join(data.IMAGE_DATASETS)}, got {cfg.data.name!r}")
    if batches < 1:
        raise ValueError(f"--steps (batches timed per worker count) must be >= 1, got {batches}")
    rows = [time_pipeline(cfg, w, batches) for w in workers]
    consumed = None
    if step:
        import jax

        from fastgpu_jax import bench

        row = bench.bench_step(cfg, 1, cfg.model.backend, steps=5)
        consumed = row.examples_per_s
        device = jax.devices()[0].device_kind
    d = cfg.data
    print(f"input pipeline: {d.name} at {d.dir}, batch {d.batch_size}, {d.image_size}x{d.image_size} "
          f"{'random-resized crops + flip' if d.augment else 'center crops'}, {os.cpu_count()} CPU cores here; "
          f"{batches} batches timed after a warm-up (the first batch, and those the workers prefetched meanwhile)")
    if consumed:
        print(f"train step on {device}: {consumed:,.0f} images/s ({cfg.model.name}, {cfg.train.precision}); "
              "'vs step' < 1 means the device waits for data")
    print(format_table(rows, consumed))
    result = {"rows": [r.as_dict() for r in rows], "step_images_per_s": consumed, "cpu_count": os.cpu_count()}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result
