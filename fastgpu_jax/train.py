"""The training loop, top to bottom: config -> mesh -> data -> state (fresh or restored) -> steps -> logs,
evaluations and checkpoints.

Speed: the step is dispatched asynchronously and metrics stay on the device until a log step (no host sync
in between); the next batch is fetched and sent to the devices while the current step runs (double
buffering); the state's buffers are donated to the step.

``train(cfg, workdir)`` resumes from ``workdir/checkpoints`` when it holds one, and a resumed run ends
bit-identical to an uninterrupted one: the batch of step s is a pure function of (seed, s), the dropout key
of step s is ``fold_in(rng, s)``, the data-iterator position and the not-yet-logged metrics of the current
log window are saved with the state, and ``metrics.jsonl`` is cut back to the restored step.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

from fastgpu_jax import checkpoint, config as config_lib, data, parallel, steps, workdir as workdir_lib
from fastgpu_jax.builders import (apply_kernel_tuning, build_state, data_kwargs, dataset_info, loader_kwargs,
                                  op_backend)
from fastgpu_jax.errors import CheckpointError, NonFiniteError
from fastgpu_jax.evaluate import run_eval
from fastgpu_jax.state import with_shardings
from fastgpu_jax.writers import MetricWriter, read_metrics

_PACKAGES = ("fastgpu_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def train(cfg, workdir: str, *, allow_config_change: bool = False, restart: bool = False) -> dict:
    """Trains (or resumes) the run described by ``cfg`` in ``workdir``; returns the final metrics.

    ``allow_config_change=True`` resumes even if keys that change the computation differ from the
    checkpointed run's config (otherwise that is an error naming the keys). ``restart=True`` moves an
    earlier run's checkpoints, metrics and logs into ``workdir/restarted/N/`` and starts at step 0; without
    it a workdir whose checkpoints are all unusable is an error, never a silent restart.
    """
    if isinstance(cfg, str):
        cfg = config_lib.load_config(cfg)
    existed = os.path.isdir(os.path.abspath(workdir))
    workdir = workdir_lib.prepare(workdir)
    try:
        _set_determinism(cfg.train.deterministic)
        p = cfg.parallel
        parallel.initialize(p.coordinator, p.num_processes, p.process_id, p.init_timeout_s)  # before device use
        jax.config.update("jax_threefry_partitionable", True)  # random bits independent of the sharding
        with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):  # one writer per workdir
            if restart:
                _set_aside_for_restart(workdir)
            return _train(cfg, workdir, allow_config_change)
    except BaseException:
        if not existed and jax.process_index() == 0:
            workdir_lib.remove_if_empty_run(workdir)  # a failed start leaves no empty workdir behind
        raise


def _train(cfg, workdir: str, allow_config_change: bool) -> dict:
    apply_kernel_tuning(cfg)
    t, p = cfg.train, cfg.parallel
    mesh = parallel.make_mesh(cfg)
    strategy = parallel.get_strategy(p.strategy, mesh, batch_size=cfg.data.batch_size,
                                     eval_batch_size=cfg.data.eval_batch_size, fsdp_rules=p.fsdp_rules)
    info = dataset_info(cfg)
    train_iter = data.train_iterator(cfg.data.name, batch_size=cfg.data.batch_size, seed=cfg.seed,
                                     data_dir=cfg.data.dir, augment=cfg.data.augment,
                                     process_index=jax.process_index(), process_count=jax.process_count(),
                                     **data_kwargs(cfg), **loader_kwargs(cfg))

    # The state is born in the strategy's layout: restored straight into its shards, or initialised by one
    # jit with those out_shardings. Under fsdp no device and no host ever holds a whole parameter.
    abstract = build_state(cfg, info, axis_name=strategy.axis_name, abstract=True)
    shardings = strategy.state_shardings(abstract)
    ckpt = checkpoint.Checkpointer(workdir, keep=t.keep_checkpoints)
    best_ckpt = checkpoint.Checkpointer(workdir, keep=1, subdir=checkpoint.BEST_DIR) if t.keep_best else None
    writer, outcome, init_note = None, {}, ""
    try:
        if ckpt.steps():
            _check_resumable(cfg, workdir, allow_config_change, info)
        restored = ckpt.restore_latest(with_shardings(abstract, shardings), set_aside_corrupt=True)
        start, loop_state = 0, {}
        if restored is not None:
            state, data_state, loop_state, start = restored
            train_iter.set_state(data_state)
        elif workdir_lib.holds_run(workdir):
            raise CheckpointError(
                f"{workdir} holds no usable checkpoint (see checkpoints/ and checkpoints_corrupt/), so resuming "
                "would start over at step 0; pass --restart (API: restart=True) to set the earlier run aside "
                "and train from scratch")
        else:
            state = build_state(cfg, info, axis_name=strategy.axis_name, shardings=shardings)
            if t.init_from:
                state, init_note = _load_init(cfg, state, info)
        _write_run_info(cfg, workdir, mesh, info)

        writer = MetricWriter(workdir, total_steps=t.steps, initial_step=start, tensorboard=cfg.log.tensorboard,
                              progress_bar=cfg.log.progress_bar, enabled=jax.process_index() == 0,
                              wandb_project=cfg.log.wandb_project if cfg.log.wandb else None,
                              run_config=config_lib.to_flat_dict(cfg))
        writer.truncate_after(start)  # only now is the restored step known; cut rows go to metrics.jsonl.N.bak
        tracker = _BestTracker(t, loop_state.get("best"))
        if start >= t.steps or tracker.stopped:  # nothing to do: say so, and report the run's last logged metrics
            why = ("it stopped early; raise train.early_stop_patience" if tracker.stopped else "raise train.steps")
            writer.print(f"already finished at step {start}/{t.steps} in {workdir}; nothing to train ({why} with "
                         "--allow-config-change to go on)")
            last_train, last_eval = _last_logged(workdir, t.eval_split)
            outcome = tracker.summary()
        else:
            writer.print(f"{'resuming at' if start else 'starting'} step {start}/{t.steps} in {workdir} "
                         f"({_run_description(cfg, mesh)})")
            for notice in _notices(cfg, mesh) + ([init_note] if init_note else []):
                writer.print(notice)
            state, last_train, last_eval, outcome = _loop(cfg, workdir, strategy, state, train_iter,
                                                          (ckpt, best_ckpt), writer, start, loop_state,
                                                          info.split_sizes["train"])
    finally:
        try:
            train_iter.close()  # stops decoding workers, if any
        finally:
            try:
                for manager in (ckpt, best_ckpt):  # a save in flight completes (or fails loudly) first
                    if manager is not None:
                        manager.close()
            finally:
                if writer is not None:
                    writer.close()
    return {"step": int(jax.device_get(strategy.host_state(state).step)), "workdir": workdir, "train": last_train,
            t.eval_split: last_eval, **outcome}


def _loop(cfg, workdir, strategy, state, train_iter, checkpointers, writer, start: int, loop_state: dict,
          epoch_size: int):
    """Steps ``start+1 .. train.steps``: train, log, evaluate (raw and EMA weights), keep the best, stop early,
    checkpoint. Returns (state, train, eval, the best/early-stop summary)."""
    t = cfg.train
    ckpt, best_ckpt = checkpointers
    pending = loop_state.get("pending", [])
    profile = _profile_window(t.profile_steps)
    state = strategy.place_state(state)
    train_fn = strategy.compile_train(steps.train_step)
    eval_fn = strategy.compile_eval(steps.eval_step)
    last_train, last_eval = {}, {}
    window_start, window_steps = time.perf_counter(), 0
    skips = _SkipLog(writer, epoch_size, cfg.data.batch_size)
    last_ema = {}
    best = _BestTracker(t, loop_state.get("best"))

    def log_window(step: int) -> dict:
        """The train row of the log window ending at ``step`` (means of its steps), written; pending emptied."""
        nonlocal pending, window_start, window_steps
        pending = _host_rows(pending)
        _stop_if_nonfinite(pending, cfg, step - len(pending) + 1, ckpt)
        elapsed = time.perf_counter() - window_start
        row = _summarise(pending, cfg)
        row["ms_per_step"] = 1000 * elapsed / max(window_steps, 1)
        row["examples_per_s"] = cfg.data.batch_size * window_steps / max(elapsed, 1e-9)
        if cfg.data.name in data.IMAGE_DATASETS and cfg.data.on_bad_example == "skip":
            row["skipped_examples"] = skips.take_window()
        writer.write(step, "train", row)
        ckpt.check()  # an asynchronous save that failed (full disk) stops the run here
        pending, window_start, window_steps = [], time.perf_counter(), 0
        return row

    def fetch():
        """The next batch, already on its way to the devices, the iterator state just after it, and the bad
        examples the pipeline skipped in it."""
        batch = next(train_iter)
        skipped = batch.pop("skipped", ())
        return strategy.place_batch(batch), train_iter.get_state(), skipped

    with op_backend(cfg):
        batch, data_state, skipped = fetch() if start < t.steps else (None, None, ())
        for step in range(start + 1, t.steps + 1):
            tracing = profile[0] <= step <= profile[1]
            if tracing and (step == profile[0] or step == start + 1):
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            state, metrics = train_fn(state, batch)  # dispatched asynchronously
            skips.add(skipped, step)
            if tracing and step in (profile[1], t.steps):
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
            batch_state = data_state
            if step < t.steps:  # double buffering: the next transfer overlaps this step's compute
                batch, data_state, skipped = fetch()
            pending.append(metrics)  # device arrays: no host sync until the log step
            window_steps += 1
            writer.progress(step)

            if step % t.log_every_steps == 0 or step == t.steps:
                last_train = log_window(step)

            if (t.eval_every_steps and step % t.eval_every_steps == 0) or step == t.steps:
                last_eval, last_ema = _evaluate_both(eval_fn, state, strategy, cfg, writer, step)
                if best.update(step, last_eval, last_ema) and best_ckpt is not None:
                    pending = _host_rows(pending)
                    _refuse_nonfinite_state(state, step, best_ckpt)
                    best_ckpt.save(step, strategy.host_state(state), batch_state, {"pending": list(pending)})
                if best.stopped:
                    writer.print(best.stop_message(step, t.eval_split))
                    if pending:
                        last_train = log_window(step)

            if step % t.checkpoint_every_steps == 0 or step == t.steps or best.stopped:
                pending = _host_rows(pending)
                _stop_if_nonfinite(pending, cfg, step - len(pending) + 1, ckpt)  # before, never after, a save
                _refuse_nonfinite_state(state, step, ckpt)
                # A copy: the save is asynchronous and the loop goes on appending to `pending`.
                ckpt.save(step, strategy.host_state(state), batch_state,
                          {"pending": list(pending), "best": best.to_json()})
            if best.stopped:
                break
    skips.finish(step if start < t.steps else t.steps)
    if last_ema:
        last_eval = {**last_eval, "ema": last_ema}
    return state, last_train, last_eval, best.summary()


def _last_logged(workdir: str, eval_split: str) -> tuple[dict, dict]:
    """The last train row and the last ``eval_split`` row of metrics.jsonl, without step and split."""
    last = {}
    for row in read_metrics(workdir):
        last[row["split"]] = {k: v for k, v in row.items() if k not in ("step", "split")}
    return last.get("train", {}), last.get(eval_split, {})


def _run_description(cfg, mesh) -> str:
    """Model, data, strategy, mesh, devices and op backend: what the start line says about a run."""
    m, p = cfg.model, cfg.parallel
    devices = f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
    if jax.process_count() > 1:
        devices += f" in {jax.process_count()} processes"
    mesh_text = ",".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1 device"
    text = (f"{m.name} on {cfg.data.name}, strategy {p.strategy}, mesh {mesh_text}, {devices}, "
            f"backend {m.backend}")
    if m.backend != "xla":  # the Pallas lowering each kernel gets here (pallas_kernels/lowering.py)
        from fastgpu_jax.pallas_kernels import lowering, tuning

        text += f", pallas lowering {lowering.describe(tuning.device_kind(), m.pallas_lowering)}"
    return text


def _notices(cfg, mesh) -> list[str]:
    """One line for each setting that works but is likely not what the user meant."""
    out = []
    if cfg.model.backend == "pallas" and jax.default_backend() == "cpu":
        out.append("note: model.backend=pallas on CPU runs the kernels in the Pallas interpreter (slow; for "
                   "checking correctness, not speed)")
    if cfg.parallel.strategy != "none" and jax.device_count() == 1:
        out.append(f"note: parallel.strategy={cfg.parallel.strategy} on a single device: nothing is split, "
                   "the run equals strategy none")
    return out


def _set_aside_for_restart(workdir: str) -> None:
    if jax.process_index() == 0:
        moved = workdir_lib.set_aside_for_restart(workdir)
        if moved:
            print(f"--restart: the earlier run's files are now in {moved}; starting at step 0", flush=True)
    if jax.process_count() > 1:  # nobody reads checkpoints/ before process 0 has moved it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fastgpu_jax restart")


def _profile_window(text: str) -> tuple[int, int]:
    """'10-15' -> (10, 15): trace those steps; (0, 0) when profiling is off (no step is 0)."""
    if not text:
        return (0, 0)
    start, _, end = text.partition("-")
    return int(start), int(end)


def _host_rows(pending: list) -> list[dict]:
    """Per-step metrics as plain Python floats (exact for float32), so they survive a JSON checkpoint."""
    return [{k: float(v) for k, v in row.items()} for row in jax.device_get(pending)]


def _stop_if_nonfinite(rows: list[dict], cfg, first_step: int, ckpt) -> None:
    """nan_policy=stop: raise at the first step whose update was skipped as non-finite. Called at log steps
    and before every save, so no checkpoint is ever written after a bad step."""
    bad = [first_step + i for i, r in enumerate(rows) if r["nonfinite"]]
    if bad and cfg.train.nan_policy == "stop":
        saved = ckpt.steps()
        newest = f"the newest checkpoint, step {saved[-1]}, predates it" if saved else "no checkpoint was written"
        raise NonFiniteError(
            f"non-finite loss, gradient norm or parameters at step {bad[0]} (train.nan_policy=stop): that update "
            f"was skipped and {newest}. Lower optimizer.lr, set optimizer.grad_clip_norm, or use "
            f"train.nan_policy=skip")


def _refuse_nonfinite_state(state, step: int, ckpt) -> None:
    """Last line of defence: never let a checkpoint with non-finite values rotate out the finite ones."""
    if not bool(_state_is_finite(state)):
        saved = ckpt.steps()
        raise NonFiniteError(f"the train state at step {step} holds non-finite values; not saving it (the newest "
                             f"checkpoint{f', step {saved[-1]},' if saved else ''} is untouched)")


@jax.jit
def _state_is_finite(state):
    leaves = jax.tree.leaves((state.params, state.opt_state, state.batch_stats))
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
                               or [True]))


def _summarise(rows: list[dict], cfg) -> dict:
    """Means over the log window (float64) of the steps whose update was applied; skipped (non-finite)
    steps are counted in ``nonfinite_steps``. A mean that is itself non-finite is logged as null."""
    good = [r for r in rows if not r["nonfinite"]] or rows
    out = {k: float(np.mean([r[k] for r in good])) for k in ("loss", "accuracy", "grad_norm")}
    out["lr"] = rows[-1]["lr"]
    if cfg.train.precision == "float16":
        out["loss_scale"] = rows[-1]["loss_scale"]
    bad = len(rows) - len([r for r in rows if not r["nonfinite"]])
    if bad:
        out["nonfinite_steps"] = bad
    return out


class _SkipLog:
    """Bad examples skipped by the image pipeline (data.on_bad_example=skip): each reason printed once, a count
    per epoch printed when the epoch ends (and for the last, unfinished one when the run ends), and counts in the
    train rows of the log window (``skipped_examples``). Counts are this process's rows since the run (or the
    resume) started; an epoch is the one the batch's first row belongs to."""

    def __init__(self, writer, epoch_size: int, batch_size: int):
        self.writer, self.seen, self.window = writer, set(), 0
        self.epoch_size, self.batch_size = max(epoch_size, 1), batch_size
        self.epoch, self.in_epoch = None, 0

    def add(self, reasons, step: int) -> None:
        epoch = (step - 1) * self.batch_size // self.epoch_size
        if self.epoch is not None and epoch != self.epoch and self.in_epoch:
            self.writer.print(f"epoch {self.epoch + 1}: skipped {self.in_epoch} bad example(s)")
            self.in_epoch = 0
        self.epoch = epoch
        self.window += len(reasons)
        self.in_epoch += len(reasons)
        for reason in reasons:
            if reason not in self.seen:
                self.seen.add(reason)
                self.writer.print(f"skipped a bad example (data.on_bad_example=skip): {reason}")

    def finish(self, step: int) -> None:
        if self.in_epoch:
            self.writer.print(f"epoch {self.epoch + 1} (to step {step}): skipped {self.in_epoch} bad example(s)")

    def take_window(self) -> int:
        count, self.window = self.window, 0
        return count


def _load_init(cfg, state, info):
    """``train.init_from``: the fresh state with every tensor the source has replaced (and the EMA, if kept,
    starting from the loaded weights); the rest keeps its init. Returns (state on the host, the mapping's report
    as one line). The loop places the state in the strategy's layout as usual."""
    from fastgpu_jax import pretrained
    from fastgpu_jax.state import copy

    fetch = jax.device_get
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        fetch = lambda tree: multihost_utils.process_allgather(tree, tiled=True)  # noqa: E731
    params, stats, report = pretrained.load_init(cfg.train.init_from, fetch(state.params), fetch(state.batch_stats),
                                                 model_name=cfg.model.name, image_shape=tuple(info.image_shape))
    ema = {"params": copy(params), "batch_stats": copy(stats)} if state.ema else state.ema
    note = f"train.init_from: {' '.join(report.summary().split())}"
    return state.replace(params=params, batch_stats=stats, ema=ema), note


def _evaluate_both(eval_fn, state, strategy, cfg, writer, step: int) -> tuple[dict, dict]:
    """The eval split's row for the raw params and, when the run keeps an EMA, the ``<split>_ema`` row for the
    EMA weights (same data, same compiled step); both written to the logs."""
    split = cfg.train.eval_split
    raw = _evaluate(eval_fn, state, strategy, cfg, split)
    writer.write(step, split, raw)
    if not state.ema:
        return raw, {}
    ema = _evaluate(eval_fn, steps.ema_view(state), strategy, cfg, split)
    writer.write(step, f"{split}_ema", ema)
    return raw, ema


class _BestTracker:
    """``train.keep_best`` and ``train.early_stop_patience``: the best value so far of one eval metric (raw or
    ``ema_`` weights; loss is minimised, accuracies maximised), and evaluations since it improved. Its JSON
    travels in every checkpoint's loop state, so a resumed run keeps comparing against the same best and counts
    patience across the interruption."""

    def __init__(self, t, saved: dict | None):
        self.metric = t.keep_best or "accuracy"
        self.patience = t.early_stop_patience
        if not saved or saved.get("metric") != self.metric:  # a new run, or keep_best changed on resume
            saved = {}
        self.best, self.best_step, self.since = saved.get("value"), saved.get("step"), saved.get("since", 0)

    @property
    def stopped(self) -> bool:
        return bool(self.patience) and self.since >= self.patience

    def update(self, step: int, raw: dict, ema: dict) -> bool:
        """Records one evaluation; True when it is a new best."""
        row, key = (ema, self.metric[4:]) if self.metric.startswith("ema_") else (raw, self.metric)
        value = row.get(key)
        if value is None:  # e.g. top5_accuracy with 5 classes or fewer: the config check names it first
            return False
        better = self.best is None or (value < self.best if key == "loss" else value > self.best)
        if better:
            self.best, self.best_step, self.since = float(value), step, 0
        else:
            self.since += 1
        return better

    def stop_message(self, step: int, split: str) -> str:
        return (f"early stopping at step {step}: {split} {self.metric} has not improved for {self.since} "
                f"evaluations (train.early_stop_patience={self.patience}); best {self.best:.6g} at step "
                f"{self.best_step}")

    def to_json(self) -> dict:
        return {"metric": self.metric, "value": self.best, "step": self.best_step, "since": self.since}

    def summary(self) -> dict:
        """What the run's result reports: the best evaluation, and the step it stopped early at (if it did)."""
        out = {"best": {"metric": self.metric, "value": self.best, "step": self.best_step}}
        if self.stopped:
            out["stopped_early"] = True
        return out


def _evaluate(eval_fn, state, strategy, cfg, split: str) -> dict:
    start = time.perf_counter()
    batches = data.eval_batches(cfg.data.name, split, batch_size=cfg.data.eval_batch_size,
                                data_dir=cfg.data.dir, **data_kwargs(cfg), **loader_kwargs(cfg))
    out = run_eval(eval_fn, state, batches, place=lambda b: strategy.place_batch(b, is_global=True))
    out.pop("count")
    out["eval_seconds"] = time.perf_counter() - start
    return out


def _check_resumable(cfg, workdir: str, allow: bool, ds_info) -> None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        recorded = json.load(f)
    old = recorded["config"]
    _check_same_data(recorded.get("dataset"), ds_info, workdir, allow)
    changed = config_lib.changed_keys(old, config_lib.to_flat_dict(cfg))
    if changed and not allow:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {config_lib.to_flat_dict(cfg).get(k)!r}" for k in changed)
        raise config_lib.ConfigError(
            f"{workdir} holds a run with a different config ({diffs}); resuming would silently change it. "
            f"Use a new workdir, or pass --allow-config-change to resume anyway")


def _check_same_data(recorded: dict | None, ds_info, workdir: str, allow: bool) -> None:
    """An image data set edited since the run began (class folders added, a set re-converted, images added or
    removed) would silently shift labels, normalisation or the order of every later batch: refuse to resume."""
    if not recorded or allow or ds_info.name not in data.IMAGE_DATASETS:
        return
    now = data.info_to_json(ds_info)
    changed = [k for k in ("classes", "mean", "std") if k in recorded and list(recorded[k]) != list(now[k])]
    train_then, train_now = recorded.get("split_sizes", {}).get("train"), ds_info.split_sizes.get("train")
    if train_then is not None and train_then != train_now:
        changed.append(f"train examples {train_then} -> {train_now}")
    if changed:
        raise config_lib.ConfigError(
            f"{workdir} was trained on different data than data.dir holds now ({', '.join(changed)}); resuming "
            "would silently change labels, normalisation or the batch order. Restore the data, use a new workdir, "
            "or pass --allow-config-change to resume anyway")


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _write_run_info(cfg, workdir: str, mesh, ds_info) -> None:
    """config.json: resolved config, the data set's facts (class names, mean/std: what ``predict`` needs without
    the data), command line, package versions, devices and mesh (process 0)."""
    if jax.process_index() != 0:
        return
    info = {
        "config": config_lib.to_flat_dict(cfg),
        "dataset": data.info_to_json(ds_info),
        "command": sys.argv,
        "versions": _versions(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "mesh": dict(mesh.shape),
        "strategy": cfg.parallel.strategy,
        "process_count": jax.process_count(),
    }
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "config.json"))


def _set_determinism(deterministic: bool) -> None:
    """``train.deterministic``: XLA's deterministic GPU ops (must be set before the GPU backend starts;
    CPU runs are deterministic anyway)."""
    flag = "--xla_gpu_deterministic_ops=true"
    if deterministic and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
