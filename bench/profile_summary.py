"""Where a profiled GPU run spent its time: kernel time per step, grouped, from a jax.profiler trace.

    with jax.profiler.trace(DIR): ...run `steps` steps...
    print(summarize(DIR, steps))

Reads the trace's XSpace with jax.profiler.ProfileData (no TensorBoard needed) and sums the duration
of every event on the GPU planes' "XLA Ops" lines (one event per executed HLO op or custom call) or,
where a trace has none, on their CUDA stream lines (one event per kernel), so the groups are device
time, not wall time.
"""

from __future__ import annotations

import collections
import glob
import os

# (group, substrings of the op name that put it there); the first match wins.
GROUPS = (
    ("GDN Pallas kernels", ("gdn_",)),
    ("matmuls (cuBLAS / dot fusions)", ("gemm", "cublas", "dot", "matmul", "cutlass", "nvjet", "xmma")),
    ("attention", ("flash", "attention", "cudnn")),
    ("collectives", ("all-reduce", "all-gather", "reduce-scatter", "collective", "nccl")),
    ("copies / transposes", ("copy", "transpose", "memcpy", "memset")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other fusions (elementwise, reductions, optimizer)"


def op_times(trace_dir: str) -> dict[str, float]:
    """Total device milliseconds per op name over the whole trace (empty if no GPU plane)."""
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    totals = collections.Counter()
    for plane in ProfileData.from_file(paths[-1]).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        lines = list(plane.lines)
        ops = [l for l in lines if l.name == "XLA Ops"] or [l for l in lines if l.name.startswith("Stream")]
        for line in ops:
            for ev in line.events:
                totals[ev.name] += ev.duration_ns / 1e6
    return dict(totals)


def summarize(trace_dir: str, steps: int, top: int = 12) -> str:
    ops = op_times(trace_dir)
    if not ops:
        return "profile: no GPU 'XLA Ops' events in the trace (not a GPU run?)"
    total = sum(ops.values())
    groups = collections.Counter()
    for name, ms in ops.items():
        groups[group_of(name)] += ms
    lines = [f"profile: {total / steps:.1f} ms of GPU op time per step ({steps} steps traced)"]
    for g, ms in groups.most_common():
        lines.append(f"  {g:<52}{ms / steps:9.2f} ms  {100 * ms / total:5.1f} %")
    lines.append(f"  top {top} ops:")
    for name, ms in collections.Counter(ops).most_common(top):
        lines.append(f"    {name[:60]:<60}{ms / steps:9.2f} ms  {100 * ms / total:5.1f} %")
    return "\n".join(lines)
