"""Orbax checkpoints of (train state, data-iterator state, loop state) in ``workdir/checkpoints``.

Saves are atomic (Orbax writes to a temporary folder and renames), so a run killed mid-save leaves the
previous checkpoint intact. ``restore_latest`` walks back from the newest step: a checkpoint that fails to
restore (corrupt or partial) is reported with a warning, moved aside to ``checkpoints_corrupt/`` (kept
for inspection, never deleted) and the next older one is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from typing import Any

import flax.serialization
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Thin wrapper around ``ocp.CheckpointManager`` with three items: state, data, loop."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.corrupt_dir = os.path.abspath(os.path.join(workdir, "checkpoints_corrupt"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "loop"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, loop_state: dict) -> bool:
        """Saves at ``step``; returns False (and saves nothing) if that step is already saved."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
            data=ocp.args.JsonSave(data_state),
            loop=ocp.args.JsonSave(loop_state),
        )
        saved = self.manager.save(step, args=args)
        if not saved:
            raise RuntimeError(f"checkpoint for step {step} in {self.directory} was not written")
        return True

    def _restore(self, step: int, target_state):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, flax.serialization.to_state_dict(target_state))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
                                  loop=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        state = flax.serialization.from_state_dict(target_state, out["state"])
        return state, out["data"], out["loop"]

    def restore_latest(self, target_state) -> tuple[Any, dict, dict, int] | None:
        """(state, data_state, loop_state, step) of the newest good checkpoint, or None if there is none.

        ``target_state`` gives the structure, shapes, dtypes (and later, shardings) to restore into.
        """
        for step in reversed(self.steps()):
            try:
                state, data_state, loop_state = self._restore(step, target_state)
                return state, data_state, loop_state, step
            except Exception as err:  # noqa: BLE001 - any failure means this checkpoint is unusable
                self._set_aside(step, err)
        return None

    def _set_aside(self, step: int, err: Exception) -> None:
        os.makedirs(self.corrupt_dir, exist_ok=True)
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.corrupt_dir, str(step))
        while os.path.exists(dst):
            dst += "_"
        warnings.warn(f"checkpoint {src} could not be restored ({type(err).__name__}: "
                      f"{str(err).splitlines()[0][:200]}); moved it to {dst} and trying the previous one",
                      stacklevel=3)
        if os.path.exists(src):
            shutil.move(src, dst)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
