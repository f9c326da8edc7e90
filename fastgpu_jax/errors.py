"""Errors a user can act on. The command line prints their message (one line) and exits 2; anything else
is a bug and shows a traceback. ``FASTGPU_DEBUG=1`` (or ``--traceback``) shows the traceback for these too."""

from __future__ import annotations


class UserError(Exception):
    """A mistake or condition the user can fix: the message is one line naming the file, key or shape."""


class CheckpointError(UserError):
    """A checkpoint cannot be used as it is; nothing was moved or deleted."""


class CheckpointIncompatible(CheckpointError):
    """The checkpoint's tree, shapes or dtypes differ from the model being restored into."""


class CheckpointUnreadable(CheckpointError):
    """Reading failed for a reason that may pass (permissions, I/O error, memory): not proof of corruption."""


class WorkdirError(UserError):
    """The workdir cannot be used: not a directory, not writable, or locked by another process."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a non-finite loss, gradient norm or parameter under ``train.nan_policy=stop``."""
