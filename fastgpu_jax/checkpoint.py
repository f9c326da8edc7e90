"""Orbax checkpoints of (train state, data-iterator state, loop state) in ``workdir/checkpoints``.

Saves are atomic (Orbax writes to a temporary folder and renames), so a run killed mid-save leaves the
previous checkpoint intact.

Restoring tells three failures apart, because only one of them means the checkpoint is bad:

- **incompatible** (``CheckpointIncompatible``): the saved tree, shapes or dtypes differ from the state being
  restored into (the model or optimizer changed). Checked against the checkpoint's metadata before any
  array is read; one line names the first mismatching parameter and both shapes. Nothing is moved.
- **unreadable** (``CheckpointUnreadable``): permissions, an I/O error, memory: it may pass, so it is not
  proof of corruption. One line, nothing moved.
- **corrupt**: the files are readable and the tree fits, yet a file is missing or its content does not
  decode. Only then, and only when the caller is ``train`` (``set_aside_corrupt=True``), is the checkpoint
  moved to ``checkpoints_corrupt/`` (never deleted) and the next older one tried. Read-only callers
  (eval, predict, export, quantize) warn and try the older one without touching any file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import warnings
from typing import Any

import flax.serialization
import jax
import orbax.checkpoint as ocp

from fastgpu_jax import quiet
from fastgpu_jax.errors import CheckpointError, CheckpointIncompatible, CheckpointUnreadable

# OS errors that say "not now / not you", not "this checkpoint is broken".
_TRANSIENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT,
                     errno.ESTALE, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EINTR}
# The same, as TensorStore / absl status words inside a message.
_TRANSIENT_WORDS = ("PERMISSION_DENIED", "Permission denied", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                    "RESOURCE_EXHAUSTED", "Input/output error", "Out of memory", "out of memory")


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint was skipped (and, by ``train``, set aside)."""


class _Corrupt(Exception):
    """Internal: this step's files are readable but broken."""


LATEST_DIR = "checkpoints"  # the newest train.keep_checkpoints saves, rotated
BEST_DIR = "checkpoints_best"  # train.keep_best: the best evaluation so far, one save, never rotated by the above


class Checkpointer:
    """``ocp.CheckpointManager`` with three items: state, data, loop. ``read_only=True`` creates, moves and
    deletes nothing (eval, predict, export, quantize). ``subdir``: ``LATEST_DIR`` or ``BEST_DIR``."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False,
                 subdir: str = LATEST_DIR):
        self.directory = os.path.abspath(os.path.join(workdir, subdir))
        self.corrupt_dir = os.path.abspath(os.path.join(workdir, subdir + "_corrupt"))
        self.read_only = read_only
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory} is not a directory; move that file away")
        self.manager = None
        if read_only and not os.path.isdir(self.directory):
            return  # nothing to read, and nothing may be created
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=async_save)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "loop": ocp.JsonCheckpointHandler()}
        with quiet.absl_warnings():
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if self.manager is not None else []

    def save(self, step: int, state, data_state: dict, loop_state: dict) -> bool:
        """Saves at ``step``; returns False (and saves nothing) if that step is already saved."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
            data=ocp.args.JsonSave(data_state),
            loop=ocp.args.JsonSave(loop_state),
        )
        with self._writing():
            saved = self.manager.save(step, args=args)
        if not saved:
            raise RuntimeError(f"checkpoint for step {step} in {self.directory} was not written")
        return True

    def restore_latest(self, target_state, *, set_aside_corrupt: bool = False) -> tuple[Any, dict, dict, int] | None:
        """(state, data_state, loop_state, step) of the newest good checkpoint, or None if there is none.

        ``target_state`` gives the structure, shapes, dtypes (and shardings) to restore into. Raises
        ``CheckpointIncompatible`` / ``CheckpointUnreadable`` (nothing moved); skips corrupt checkpoints,
        moving them to ``checkpoints_corrupt/`` only when ``set_aside_corrupt``.
        """
        for step in reversed(self.steps()):
            try:
                return (*self._restore(step, target_state), step)
            except _Corrupt as err:
                self._skip_corrupt(step, str(err), set_aside_corrupt)
        return None

    def _restore(self, step: int, target_state):
        path = os.path.join(self.directory, str(step))
        _check_readable(path)
        target = flax.serialization.to_state_dict(target_state)
        with quiet.async_noise(), _classified(path):
            saved = self.manager.item_metadata(step)["state"]
        if saved is None:
            raise _Corrupt(f"{path} has no readable state metadata")
        _check_compatible(path, saved, target)
        # A field that is empty in this state (no EMA kept, say) may be absent from a checkpoint written before the
        # field existed: restore without it rather than calling a good checkpoint's structure corrupt.
        absent = [k for k, v in target.items() if k not in saved and not jax.tree.leaves(v)]
        target = {k: v for k, v in target.items() if k not in absent}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
                                  loop=ocp.args.JsonRestore())
        with quiet.async_noise(), _classified(path):
            out = self.manager.restore(step, args=args)
        if out["data"] is None or out["loop"] is None:
            raise _Corrupt(f"{path} lacks its data or loop item")
        state = {**out["state"], **{k: {} for k in absent}}
        return flax.serialization.from_state_dict(target_state, state), out["data"], out["loop"]

    def _skip_corrupt(self, step: int, reason: str, set_aside: bool) -> None:
        src = os.path.join(self.directory, str(step))
        if not set_aside or self.read_only:
            warnings.warn(f"checkpoint {src} is corrupt ({reason}); using the previous one (nothing moved)",
                          CheckpointWarning, stacklevel=3)
            return
        os.makedirs(self.corrupt_dir, exist_ok=True)
        dst = os.path.join(self.corrupt_dir, str(step))
        while os.path.exists(dst):
            dst += "_"
        warnings.warn(f"checkpoint {src} is corrupt ({reason}); moved it to {dst} and using the previous one",
                      CheckpointWarning, stacklevel=3)
        if jax.process_index() == 0 and os.path.exists(src):
            shutil.move(src, dst)
        self.manager.reload()

    def check(self) -> None:
        """Raises now if an asynchronous save has failed (called at log steps, so a full disk stops the run
        within one log interval instead of at the next save)."""
        if self.manager is not None:
            with self._writing():
                self.manager.check_for_errors()

    def wait(self) -> None:
        if self.manager is not None:
            with self._writing():
                self.manager.wait_until_finished()

    def close(self) -> None:
        if self.manager is not None:
            try:
                self.wait()
            finally:
                with quiet.async_noise():
                    self.manager.close()

    @contextlib.contextmanager
    def _writing(self):
        """A failed (possibly asynchronous, so possibly earlier) save becomes one line saying which
        checkpoint is the newest intact one; Orbax never finalizes a checkpoint whose write failed."""
        try:
            with quiet.async_noise():
                yield
        except Exception as err:  # noqa: BLE001 - classified below, re-raised as is when not a storage error
            storage = _storage_error(err)
            if storage is None:
                raise
            self.manager.reload()
            intact = self.steps()
            newest = f"the newest intact checkpoint is step {intact[-1]}" if intact else "no checkpoint is complete"
            raise CheckpointError(f"saving a checkpoint to {self.directory} failed: {storage}; {newest}") from None


def _check_readable(path: str) -> None:
    """Opens every file of a checkpoint: permissions and I/O errors show here, before Orbax's threads."""
    for root, dirs, files in os.walk(path, onerror=_raise):
        for name in files:
            file = os.path.join(root, name)
            try:
                with open(file, "rb") as f:
                    f.read(1)
            except FileNotFoundError:
                raise _Corrupt(f"{file} vanished") from None
            except OSError as err:
                raise CheckpointUnreadable(f"cannot read {file} ({err.strerror or err}); nothing was moved: "
                                           "fix its permissions or storage and run again") from None


def _raise(err: OSError) -> None:
    if isinstance(err, FileNotFoundError):
        raise _Corrupt(f"{err.filename} is missing")
    raise CheckpointUnreadable(f"cannot list {err.filename} ({err.strerror or err}); nothing was moved: "
                               "fix its permissions or storage and run again")


class _classified:
    """Turns an exception from Orbax into CheckpointUnreadable (may pass) or _Corrupt (it will not)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or not isinstance(err, Exception) or isinstance(err, CheckpointError):
            return False
        quiet.filter_async_noise()  # the failed read's coroutines will complain when collected
        summary = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
        if _is_transient(err):
            raise CheckpointUnreadable(f"reading {self.path} failed ({summary}); this may pass, so nothing was "
                                       "moved: check permissions, storage and memory, then run again") from None
        raise _Corrupt(summary) from None


def _storage_error(err: BaseException) -> str | None:
    """'No space left on device' (or the like) when a disk-full / quota / file-size error caused ``err``."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            return os.strerror(err.errno)
        for words in ("No space left on device", "Disk quota exceeded", "File too large", "Read-only file system"):
            if words in str(err):
                return words
        err = err.__cause__ or err.__context__
    return None


def _is_transient(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        if isinstance(err, MemoryError) or any(w in str(err) for w in _TRANSIENT_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


def _flat(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf for path, leaf in leaves}


def _describe(leaf) -> str:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    return f"{tuple(shape) if shape is not None else '?'} {jax.numpy.dtype(dtype).name if dtype else '?'}"


def _check_compatible(path: str, saved_tree, target_tree) -> None:
    """Raises CheckpointIncompatible naming the first parameter whose presence, shape or dtype differs."""
    saved, target = _flat(saved_tree), _flat(target_tree)
    # params first: a changed layer is what the user changed; optimizer slots only follow it.
    order = sorted(set(saved) | set(target), key=lambda k: (not k.startswith("params/"), k))
    for key in order:
        s, t = saved.get(key), target.get(key)
        if key not in saved:
            problem = f"{key} is in the model but not in the checkpoint"
        elif key not in target:
            problem = f"{key} is in the checkpoint but not in the model"
        elif (tuple(getattr(s, "shape", ())) != tuple(getattr(t, "shape", ()))
              or (getattr(s, "dtype", None) is not None and getattr(t, "dtype", None) is not None
                  and jax.numpy.dtype(s.dtype) != jax.numpy.dtype(t.dtype))):
            problem = f"{key} is {_describe(s)} in the checkpoint but {_describe(t)} in the model"
        else:
            continue
        raise CheckpointIncompatible(
            f"checkpoint {path} does not fit the current model: {problem}; nothing was moved. Resume with the "
            "run's own config, or train in a new --workdir (or pass --restart to set this run aside)")
