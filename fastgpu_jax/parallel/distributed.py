"""Multi-host start-up: ``initialize`` wraps ``jax.distributed.initialize`` with clear failures.

Where the coordinator comes from, first hit wins:
  1. config ``parallel.coordinator`` ("host:port") with ``parallel.num_processes`` and ``parallel.process_id``;
  2. the environment that ``jax.distributed.initialize()`` detects by itself (SLURM, Open MPI, ...; or
     ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``);
  3. nothing: a single-process run.
It must run before anything touches a device. A peer that never joins ends in an error after
``timeout_s`` seconds instead of a silent hang.
"""

from __future__ import annotations

import os
import sys
import threading

import jax

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri")


def _cluster_detected() -> bool:
    if os.environ.get("SLURM_NTASKS", "1") != "1" and "SLURM_JOB_ID" in os.environ:
        return True
    return any(h in os.environ for h in _ENV_HINTS[:1]) or "OMPI_MCA_orte_hnp_uri" in os.environ


def _watchdog(timeout_s: int, where: str, num_processes: int, process_id: int) -> threading.Timer:
    """Ends the process with one clear line if start-up has not finished after ``timeout_s``.

    jax's own deadline aborts the process from C++ with a stack trace and no hint of the cause; this fires
    first (jax is given a longer deadline) and says what was being waited for."""

    def fire():
        sys.stderr.write(f"fastgpu-jax: error: not every process joined within parallel.init_timeout_s="
                         f"{timeout_s}s (this is process {process_id} of {num_processes}, coordinator {where}); "
                         "start all processes with the same parallel.coordinator and num_processes\n")
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def initialize(coordinator: str = "", num_processes: int = 1, process_id: int = 0,
               timeout_s: int = 300) -> bool:
    """Joins the multi-process run if one is configured or detected; returns True if it did (or already had)."""
    if jax.distributed.is_initialized():
        return True
    if not coordinator and num_processes > 1:
        raise ValueError(f"parallel.num_processes={num_processes} needs parallel.coordinator='host:port' "
                         "(or a cluster environment such as SLURM)")
    if not coordinator and not _cluster_detected():
        return False
    timer = _watchdog(timeout_s, coordinator or "from the environment", num_processes, process_id)
    try:
        if coordinator:
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                       process_id=process_id, initialization_timeout=timeout_s + 60)
        else:
            jax.distributed.initialize(initialization_timeout=timeout_s + 60)
    except Exception as err:  # noqa: BLE001 - jax raises several types for a coordinator that never answers
        where = coordinator or "the cluster environment"
        raise RuntimeError(f"multi-host start-up via {where} failed after up to {timeout_s}s "
                           f"(process {process_id} of {num_processes}): {str(err).splitlines()[0][:300]}. "
                           "Check that every process runs with the same parallel.coordinator and "
                           "parallel.num_processes, and a distinct parallel.process_id") from err
    finally:
        timer.cancel()
    return True
