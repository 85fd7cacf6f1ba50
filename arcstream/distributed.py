"""Joining a multi-host run: one process per host, one global mesh.

`maybe_initialize()` is the only place that calls
`jax.distributed.initialize()`. It is called once, at the top of an entry
point's `main`, never at import time (Grain workers import our modules and must
not join the cluster a second time).

How a process learns it is part of a pod, in order:
1. `ARCSTREAM_COORDINATOR`, `ARCSTREAM_NUM_PROCESSES`, `ARCSTREAM_PROCESS_ID`
   (set by `launch/local.py`, handy anywhere);
2. a cluster JAX detects on its own (Cloud TPU VMs / pods, SLURM, Open MPI,
   Kubernetes): with `ARCSTREAM_DISTRIBUTED=auto` (set it on a multi-host TPU
   pod: nothing here detects one), or under SLURM with `SLURM_NTASKS` > 1,
   `jax.distributed.initialize()` is called without arguments;
3. otherwise a single process: nothing to do.
"""

from __future__ import annotations

import os

import jax
from absl import logging

_initialized = False


def maybe_initialize() -> None:
    global _initialized
    if _initialized:
        return
    coord = os.environ.get("ARCSTREAM_COORDINATOR")
    if coord:
        try:
            n = int(os.environ["ARCSTREAM_NUM_PROCESSES"])
            i = int(os.environ["ARCSTREAM_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise ValueError(
                "ARCSTREAM_COORDINATOR is set, so ARCSTREAM_NUM_PROCESSES and ARCSTREAM_PROCESS_ID must be "
                f"integers too (got {os.environ.get('ARCSTREAM_NUM_PROCESSES')!r}, "
                f"{os.environ.get('ARCSTREAM_PROCESS_ID')!r})"
            ) from e
        logging.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d)", coord, n, i)
        jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=i)
    elif os.environ.get("ARCSTREAM_DISTRIBUTED") == "auto" or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        logging.info("jax.distributed.initialize() with cluster auto-detection")
        jax.distributed.initialize()
    _initialized = True
