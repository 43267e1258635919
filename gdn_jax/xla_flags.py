"""XLA flags the command lines set before the backend starts (imports no JAX, so it can run first).

Every flag here is set only where the user's XLA_FLAGS does not already name it, so a user's own
value always wins. XLA reads XLA_FLAGS once, when the first backend starts; every flag below is
known to jaxlib 0.10 to 0.12 (an unknown one would abort the start), and GPU flags are inert on
other backends.
"""

from __future__ import annotations

import os

_MiB = 1 << 20

# Overlap of communication with computation in the train step (docs/training.md, "Overlap"):
OVERLAP_FLAGS = {
    # Schedule the step's collectives (FSDP all-gathers, gradient reduce-scatters and all-reduces,
    # context-parallel exchanges) as async start/done pairs placed around independent compute,
    # by a model of their latency, instead of where the program order puts them.
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    # Collectives run on a high-priority stream, so compute kernels cannot delay their start.
    "xla_gpu_enable_highest_priority_async_stream": "true",
    # Combine small collectives into buckets of up to this size: fewer NCCL launches, while the
    # buckets stay small enough for the last one of the backward to be short.
    "xla_gpu_all_reduce_combine_threshold_bytes": str(64 * _MiB),
    "xla_gpu_all_gather_combine_threshold_bytes": str(64 * _MiB),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(64 * _MiB),
    # With gradient accumulation (a scan over microbatches) one microbatch's reductions overlap
    # the next microbatch's compute.
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
}


def _add_flags(flags: dict[str, str]) -> None:
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f"--{name}={value}" for name, value in flags.items() if name not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def overlap_collectives() -> None:
    """Sets OVERLAP_FLAGS (see above) unless the user's XLA_FLAGS names them."""
    _add_flags(OVERLAP_FLAGS)


def single_threaded_eigen_on_cpu() -> None:
    """XLA:CPU's multi-threaded Eigen path deadlocks intermittently on this model's backward pass
    (seen with jax 0.10.2 on 2 cores, chunked GDN; docs/training.md); single-threaded Eigen is also
    faster for the tiny CPU configs. Only the CPU backend reads this flag, and only if it is set
    before the backend starts. A user's own setting of the flag is kept."""
    _add_flags({"xla_cpu_multi_thread_eigen": "false"})
