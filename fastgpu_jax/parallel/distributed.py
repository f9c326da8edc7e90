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

import jax

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri")


def _cluster_detected() -> bool:
    if os.environ.get("SLURM_NTASKS", "1") != "1" and "SLURM_JOB_ID" in os.environ:
        return True
    return any(h in os.environ for h in _ENV_HINTS[:1]) or "OMPI_MCA_orte_hnp_uri" in os.environ


def initialize(coordinator: str = "", num_processes: int = 1, process_id: int = 0,
               timeout_s: int = 300) -> bool:
    """Joins the multi-process run if one is configured or detected; returns True if it did (or already had)."""
    if jax.distributed.is_initialized():
        return True
    try:
        if coordinator:
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                       process_id=process_id, initialization_timeout=timeout_s)
        elif num_processes > 1:
            raise ValueError(f"parallel.num_processes={num_processes} needs parallel.coordinator='host:port' "
                             "(or a cluster environment such as SLURM)")
        elif _cluster_detected():
            jax.distributed.initialize(initialization_timeout=timeout_s)
        else:
            return False
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - jax raises several types for a coordinator that never answers
        where = coordinator or "the cluster environment"
        raise RuntimeError(f"multi-host start-up via {where} failed after up to {timeout_s}s "
                           f"(process {process_id} of {num_processes}): {str(err).splitlines()[0][:300]}. "
                           "Check that every process runs with the same parallel.coordinator and "
                           "parallel.num_processes, and a distinct parallel.process_id") from err
    return True
