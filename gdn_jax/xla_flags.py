"""XLA flags the command lines set before the backend starts (imports no JAX, so it can run first)."""

from __future__ import annotations

import os


def single_threaded_eigen_on_cpu() -> None:
    """XLA:CPU's multi-threaded Eigen path deadlocks intermittently on this model's backward pass
    (seen with jax 0.10.2 on 2 cores, chunked GDN; docs/training.md); single-threaded Eigen is also
    faster for the tiny CPU configs. Only the CPU backend reads this flag, and only if it is set
    before the backend starts. A user's own setting of the flag is kept."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
