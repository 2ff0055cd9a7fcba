"""Multi-host: every host runs one JAX process and the same driver program (SPMD). After
jax.distributed.initialize, jax.devices() lists the devices of all processes, so the tp x pp
mesh can span hosts; each process feeds the same host inputs and gets the same sampled tokens
back (runner uses parallel.plan.put / fetch, which handle arrays spread over processes).

Supported: tensor parallelism across processes (and data parallelism as one server per host).
Pipeline stages across processes are refused: handing activations between hosts needs JAX's
cross-host device transfers, and on jax 0.10 CPU a computation placed only on another process's devices
segfaulted or hung in our tests."""
from __future__ import annotations

import logging

logger = logging.getLogger("jaxserve")

_initialized = False


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join the cluster (idempotent). On CPU the collectives go through gloo."""
    global _initialized
    if _initialized:
        return
    import jax

    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    platforms = jax.config.jax_platforms or ""
    if "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    _initialized = True
    logger.info("process %d/%d joined %s: %d global devices, %d local", process_id, num_processes,
                coordinator_address, jax.device_count(), jax.local_device_count())

