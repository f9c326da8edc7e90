"""Keeps Orbax's, grain's and absl's shutdown and failure noise off the user's terminal.

A failed Orbax read leaves coroutines that print "Exception ignored in: <coroutine ...>" tracebacks when
they are garbage-collected, asyncio logs "Task exception was never retrieved" / "Event loop is closed", and
absl logs warnings for options we set on purpose. None of it says more than the one-line error we raise.
``FASTGPU_DEBUG=1`` turns all filtering off.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys

_NOISY_LOGGERS = ("absl", "asyncio", "grain", "orbax", "jax._src.distributed")


def debug() -> bool:
    return os.environ.get("FASTGPU_DEBUG", "") not in ("", "0", "false", "False")


def _is_noise(unraisable) -> bool:
    text = f"{unraisable.object!r} {unraisable.exc_value!r}"
    return any(w in text for w in ("coroutine", "Event loop is closed", "orbax", "tensorstore", "TensorStore"))


def _filtered(previous_hook):
    """An unraisable hook that drops the noise and passes everything else to ``previous_hook``."""

    def hook(unraisable):
        if not _is_noise(unraisable):
            previous_hook(unraisable)

    return hook


@contextlib.contextmanager
def async_noise():
    """Swallows the unraisable-exception tracebacks of abandoned Orbax coroutines inside this block."""
    if debug():
        yield
        return
    previous_hook = sys.unraisablehook
    asyncio_log = logging.getLogger("asyncio")
    previous_level = asyncio_log.level
    sys.unraisablehook = _filtered(previous_hook)
    asyncio_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        gc.collect()  # let abandoned coroutines die while the hook is still ours
        sys.unraisablehook = previous_hook
        asyncio_log.setLevel(previous_level)


@contextlib.contextmanager
def absl_warnings():
    """absl/Orbax warnings about options chosen on purpose (read-only managers) stay silent here."""
    log = logging.getLogger("absl")
    previous = log.level
    if not debug():
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(previous)


_FILTER_INSTALLED = False


def filter_async_noise() -> None:
    """Process-wide and idempotent: after a failed Orbax read, its abandoned coroutines and closed event
    loops keep raising "Exception ignored" tracebacks long after the error was handled; drop those (only
    those: any other unraisable exception still reaches the previous hook)."""
    global _FILTER_INSTALLED
    if _FILTER_INSTALLED or debug():
        return
    sys.unraisablehook = _filtered(sys.unraisablehook)
    _FILTER_INSTALLED = True


def for_command_line() -> None:
    """Process-wide, for the CLI: library loggers silenced (their errors reach the user as our one-line
    error; Orbax's background threads log each failure with a full traceback) and abandoned-coroutine
    tracebacks dropped."""
    if debug():
        return
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    filter_async_noise()
