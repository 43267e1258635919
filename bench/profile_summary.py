"""Where a profiled GPU run spent its time: kernel time per step, grouped, and exposed communication,
from a jax.profiler trace; and the collectives of a compiled step, from its HLO text.

    with jax.profiler.trace(DIR): ...run `steps` steps...
    print(summarize(DIR, steps, step_ms=...))
    print(collectives_table(hlo_collectives(compiled.as_text())))

Reads the trace's XSpace with jax.profiler.ProfileData (no TensorBoard needed) and sums the duration
of every event on the GPU planes' "XLA Ops" lines (one event per executed HLO op or custom call) or,
where a trace has none, on their CUDA stream lines (one event per kernel), so the groups are device
time, not wall time.

Exposed communication: on each GPU, the time during which a collective kernel (NCCL) runs on some
stream and no other kernel runs on any stream: what overlap has not hidden, and what the step would
lose with infinitely fast links. It needs the per-stream kernel timeline (the "Stream" lines); an
NCCL kernel's time includes its wait for the other GPUs, so load imbalance counts as communication.
"""

from __future__ import annotations

import collections
import glob
import os
import re

# (group, substrings of the op name that put it there); the first match wins.
GROUPS = (
    ("GDN Pallas kernels", ("gdn_",)),
    ("matmuls (cuBLAS / dot fusions)", ("gemm", "cublas", "dot", "matmul", "cutlass", "nvjet", "xmma")),
    ("attention", ("flash", "attention", "cudnn")),
    ("collectives", ("all-reduce", "all-gather", "reduce-scatter", "collective", "nccl", "all-to-all")),
    ("copies / transposes", ("copy", "transpose", "memcpy", "memset")),
)
COMMUNICATION = GROUPS[3][1]
MATMULS = GROUPS[1][0]


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other fusions (elementwise, reductions, optimizer)"


def is_communication(name: str) -> bool:
    low = name.lower()
    return any(k in low for k in COMMUNICATION)


def _gpu_planes(trace_dir: str):
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    return [p for p in ProfileData.from_file(paths[-1]).planes if p.name.startswith("/device:GPU")]


def _op_events(trace_dir: str):
    """Every GPU op event of the trace (the "XLA Ops" lines, else the streams')."""
    for plane in _gpu_planes(trace_dir):
        lines = list(plane.lines)
        ops = [l for l in lines if l.name == "XLA Ops"] or [l for l in lines if l.name.startswith("Stream")]
        for line in ops:
            yield from line.events


def op_times(trace_dir: str) -> dict[str, float]:
    """Total device milliseconds per op name over the whole trace (empty if no GPU plane)."""
    totals = collections.Counter()
    for ev in _op_events(trace_dir):
        totals[ev.name] += ev.duration_ns / 1e6
    return dict(totals)


def _hlo_op(ev) -> str:
    """The HLO instruction a kernel event ran for (its "hlo_op" stat), else the event's name. A
    kernel launched from a command buffer (a CUDA graph) has the buffer's instruction as its stat
    ("command_buffer_1" for every kernel of the step's graph, H200 trace of 2026-12-03); its own
    name is then the best lead (a fusion's kernel is named after it; hlo_op_names maps that)."""
    op = dict(getattr(ev, "stats", ())).get("hlo_op", ev.name)
    return ev.name if op.startswith("command_buffer") else op


def op_times_by_hlo_op(trace_dir: str) -> dict[str, float]:
    """Total device milliseconds per HLO instruction: a kernel event's "hlo_op" stat names the
    instruction that launched it (a cuBLAS kernel's name is nvjet_..., a fusion's kernel name has
    "_" where the instruction has "."), so this is what leads an op to its named scope."""
    totals = collections.Counter()
    for ev in _op_events(trace_dir):
        totals[_hlo_op(ev)] += ev.duration_ns / 1e6
    return dict(totals)


def op_count(trace_dir: str) -> int:
    """How many GPU ops ran in the trace: at small batches each is a launch whose fixed cost, not
    its bytes, can hold the step (decoding at B = 1)."""
    return sum(1 for _ in _op_events(trace_dir))


def _union(intervals):
    """Sorted, disjoint [start, end) intervals covering the given ones."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def idle_gaps(events, min_ns: float = 20e3, top: int = 5):
    """Where a GPU ran no op: (total idle ns between the first op's start and the last op's end,
    the `top` longest gaps of at least `min_ns` as (gap ns, op before, op after)), from op events
    (name, start_ns, duration_ns; an "hlo_op" stat names the op when present). Overlapping ops
    count once."""
    evs = sorted(events, key=lambda ev: ev.start_ns)
    idle, gaps, end, last = 0.0, [], None, None
    for ev in evs:
        if end is not None and ev.start_ns > end:
            idle += ev.start_ns - end
            if ev.start_ns - end >= min_ns:
                gaps.append((ev.start_ns - end, _hlo_op(last), _hlo_op(ev)))
        if end is None or ev.start_ns + ev.duration_ns > end:
            end, last = ev.start_ns + ev.duration_ns, ev
    return idle, sorted(gaps, key=lambda g: -g[0])[:top]


def exposed_time(communication, computation) -> tuple[float, float]:
    """(time covered by the communication intervals, the part of it no computation interval
    covers); intervals are (start, end) pairs in any unit."""
    comm, comp = _union(communication), _union(computation)
    total = sum(b - a for a, b in comm)
    hidden, j = 0.0, 0
    for a, b in comm:
        while j < len(comp) and comp[j][1] <= a:
            j += 1
        k = j
        while k < len(comp) and comp[k][0] < b:
            hidden += min(b, comp[k][1]) - max(a, comp[k][0])
            k += 1
    return total, total - hidden


def communication_times(planes) -> list[tuple[float, float]]:
    """Per GPU plane: (collective kernel ms, exposed ms) from its stream lines' kernel events."""
    out = []
    for plane in planes:
        comm, comp = [], []
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                interval = (ev.start_ns, ev.start_ns + ev.duration_ns)
                (comm if is_communication(ev.name) else comp).append(interval)
        total, exposed = exposed_time(comm, comp)
        out.append((total / 1e6, exposed / 1e6))
    return out


# ---- where in the model: HLO op names -> named scopes ---------------------------------------------

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([^\s=]+) = [^\n]*?metadata=\{[^}\n]*?op_name="([^"]*)"', re.M)
_WRAPPED = re.compile(r"^([\w-]+)\((.*)\)$")
# Path parts that are control flow or transformations, not places in the model.
_STRUCTURAL = {"while", "body", "cond", "closed_call", "remat", "checkpoint", "custom_jvp_call",
               "custom_vjp_call", "custom_vjp_call_jaxpr", "shard_map", "scan", "vmap", "core_call"}


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """{instruction name: its metadata op_name} of a compiled HLO module's text. A fusion carries
    its root's op_name, so a profiled op's name leads to the jax.named_scope it came from."""
    names = {}
    for name, op in _INSTRUCTION.findall(hlo_text):
        name = name.lstrip("%")
        # A fusion's kernel is named after it with "_" for "." (loop_add_fusion.21 ->
        # loop_add_fusion_21): the name a kernel launched from a command buffer is known by.
        names.setdefault(name.replace(".", "_"), op)
        names[name] = op
    return names


def scope_of(op_name: str, depth: int = 2) -> str:
    """The model place of an op_name: its first `depth` named scopes, without jit wrappers,
    transformations, control flow or einsum specs; ops of the backward pass (under transpose) get
    " (bwd)". "jit(step)/transpose(jvp(block))/mlp/dot_general" -> "block/mlp (bwd)".
    A fusion carries its root op's name, so the ops fused into it count where the root is."""
    kept, backward = [], False
    for part in op_name.split("/")[:-1]:  # the last part is the primitive
        while (m := _WRAPPED.match(part)):
            wrapper, part = m.groups()
            backward |= wrapper == "transpose"
            if wrapper in ("jit", "pjit"):
                part = ""
        if part and part not in _STRUCTURAL and "->" not in part:
            kept.append(part)
    return ("/".join(kept[:depth]) or "(no scope)") + (" (bwd)" if backward else "")


def scope_table(ops: dict[str, float], op_names: dict[str, str], steps: int, top: int = 30) -> str:
    """GPU ms per step by model scope (scope_of), split into matmuls and the rest."""
    rows = collections.defaultdict(lambda: [0.0, 0.0])
    for name, ms in ops.items():
        op = op_names.get(name)
        scope = "(not in the HLO)" if op is None else scope_of(op)
        matmul = group_of(name) == MATMULS or (op or "").endswith("dot_general")
        rows[scope][0 if matmul else 1] += ms
    total = sum(ops.values())
    lines = [f"  by scope (jax.named_scope; top {top}):{'matmul ms':>27}{'other ms':>11}{'share':>8}"]
    for scope, (mm, other) in sorted(rows.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"    {scope[:50]:<50}{mm / steps:9.2f}{other / steps:11.2f}"
                     f"{100 * (mm + other) / total:7.1f} %")
    return "\n".join(lines)


def summarize(trace_dir: str, steps: int, top: int = 12, step_ms: float | None = None,
              hlo_text: str | None = None) -> str:
    """Device time per op group (and, given the compiled step's HLO text, per model scope) of a
    trace of `steps` steps."""
    ops = op_times(trace_dir)
    if not ops:
        return "profile: no GPU 'XLA Ops' events in the trace (not a GPU run?)"
    total = sum(ops.values())
    groups = collections.Counter()
    for name, ms in ops.items():
        groups[group_of(name)] += ms
    lines = [f"profile: {total / steps:.1f} ms of GPU op time per step ({steps} steps traced), "
             f"{op_count(trace_dir) / steps:.0f} GPU ops per step"]
    for g, ms in groups.most_common():
        lines.append(f"  {g:<52}{ms / steps:9.2f} ms  {100 * ms / total:5.1f} %")
    idle, gaps = idle_gaps(list(_op_events(trace_dir)))
    lines.append(f"  {'no GPU op running (first op to last)':<52}{idle / 1e6 / steps:9.2f} ms per step; "
                 f"longest gaps:")
    for ns, before, after in gaps:
        lines.append(f"    {ns / 1e3:8.1f} us  after {before[:45]}  before {after[:45]}")
    lines.append(f"  top {top} ops:")
    for name, ms in collections.Counter(ops).most_common(top):
        lines.append(f"    {name[:60]:<60}{ms / steps:9.2f} ms  {100 * ms / total:5.1f} %")
    if hlo_text is not None:
        lines.append(scope_table(op_times_by_hlo_op(trace_dir), hlo_op_names(hlo_text), steps))
    comm = communication_times(_gpu_planes(trace_dir))
    if comm:
        kernel = sum(c for c, _ in comm) / len(comm) / steps
        exposed = sum(e for _, e in comm) / len(comm) / steps
        share = f" = {100 * exposed / step_ms:.1f} % of the {step_ms:.1f} ms step" if step_ms else ""
        lines.append(f"communication per step (mean of {len(comm)} GPU(s) of this process): "
                     f"{kernel:.2f} ms of collective kernels, {exposed:.2f} ms exposed{share}")
    return "\n".join(lines)


# ---- collectives of a compiled step (HLO text) -------------------------------------------------

_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1,
          "pred": 1, "s64": 8, "u64": 8}
_COLLECTIVE = re.compile(r"^\s*\S+ = (.*?) (all-reduce|all-gather|reduce-scatter|"
                         r"collective-permute|all-to-all)(?:-start)?\(", re.M)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def hlo_collectives(hlo_text: str) -> dict[tuple[str, str], tuple[int, int]]:
    """{(collective, dtype): (count, bytes of its results)} of an HLO module's text (async pairs
    counted once, at their start). Results of an async start hold its operands too, so their bytes
    are an upper bound."""
    out = collections.defaultdict(lambda: [0, 0])
    for shapes, op in _COLLECTIVE.findall(hlo_text):
        for dtype, dims in _ARRAY.findall(shapes):
            if dtype not in _BYTES:
                continue
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            entry = out[(op, dtype)]
            entry[0] += 1
            entry[1] += n * _BYTES[dtype]
    return {k: tuple(v) for k, v in sorted(out.items())}


def collectives_table(collectives: dict) -> str:
    lines = ["collectives in the compiled step (per device):"]
    for (op, dtype), (count, nbytes) in collectives.items():
        lines.append(f"  {op:<20}{dtype:<6}{count:6d} arrays {nbytes / 2**20:10.1f} MiB")
    if len(lines) == 1:
        lines.append("  none")
    return "\n".join(lines)
