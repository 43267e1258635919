"""Checks and times the gated delta rule on one GPU: every Pallas backend and variant, the plain-XLA
chunk path, FLA's Triton kernels and FlashQLA, at the same shapes in one process (FlashQLA in a child).

    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/bench_kernels.py [--shapes all] \
        [--variants triton,mosaic,mosaic-p4] [--iters 30] [--flashqla-site DIR] [--out DIR]

For each shape (B, T, H, HV, K, V) in bf16 it
  1. checks the first variant of each backend (every variant with --check-all) against the chunk
     path run in float32 at HIGHEST precision (forward output, final state, and all five input
     gradients under a random cotangent);
  2. times forward and forward+backward (median over batches of 10 back-to-back calls, --iters
     calls in all, after warm-up; --rounds R interleaves R such timings of every variant) for
     every variant, for chunk, for FLA's chunk_gated_delta_rule (FLA_FLASH_QLA=0: its own Triton
     kernels) and, given --flashqla-site (an unpacked FlashQLA + TileLang), for
     flash_qla.chunk_gated_delta_rule (both with triton.testing.do_bench: CUDA events, median);
  3. reports the compile time of each variant's jitted forward+backward, and peak extra device memory
     (XLA's temp allocation; for FLA torch's max_memory_allocated above the inputs).
The last lines are a table with each variant's ratios against FLA and FlashQLA (above 1: ours faster).
Variants are a backend name and optional launch knobs (see parse_variants), e.g. mosaic-bv128p2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("FLA_FLASH_QLA", "0")  # FLA's own kernels; FlashQLA is timed on its own

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gdn_jax.chunked import chunk_gated_delta_rule  # noqa: E402
from gdn_jax.ops import gated_delta_rule  # noqa: E402
from kernels_pallas import pallas_gated_delta_rule  # noqa: E402
from kernels_pallas.gated_delta_rule import padded_head_dims  # noqa: E402

SHAPES = {  # (B, T, H, HV, K, V)
    "h16k128": (4, 4096, 16, 16, 128, 128),
    "t16k": (1, 16384, 16, 16, 128, 128),
    "paper1.3b": (4, 4096, 9, 9, 200, 400),
    "h6k256v512": (2, 4096, 6, 6, 256, 512),
    "qwen3next": (2, 4096, 16, 32, 128, 128),  # Qwen3-Next's GVA layer
    "fla1.3b": (4, 4096, 6, 6, 256, 512),  # the fla_gdn_1.3b training step's layer (21 per step)
}
SMOKE = {"tiny": (1, 256, 1, 2, 64, 64)}  # for trying the script itself (CPU, interpret mode)
PADDED = {"paper1.3b_padded": (4, 4096, 9, 9, 256, 448)}  # what the kernels see of paper1.3b


def make_inputs(shape, seed=0, dtype=jnp.bfloat16):
    B, T, H, HV, K, V = shape
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, HV, V), jnp.float32)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, HV), jnp.float32))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, HV), jnp.float32))
    dO = jax.random.normal(ks[5], (B, T, HV, V), jnp.float32)
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta), dO


def zeros_state(q, v):
    return jnp.zeros((q.shape[0], v.shape[2], q.shape[3], v.shape[3]), jnp.float32)


def pallas_fn(**launch):
    """The Pallas op with launch parameters (sweeps, block_v, segments, ...; see
    kernels_pallas.gated_delta_rule.pallas_gated_delta_rule)."""
    def f(q, k, v, g, beta):
        return pallas_gated_delta_rule(q, k, v, g, beta, scale=q.shape[-1] ** -0.5,
                                       initial_state=zeros_state(q, v), reset=None, chunk_size=64, **launch)
    return f


def chunk_fn(q, k, v, g, beta):
    return chunk_gated_delta_rule(q, k, v, g, beta, scale=q.shape[-1] ** -0.5,
                                  initial_state=zeros_state(q, v), reset=None, chunk_size=64)


def fwd_and_grad(fn, dO):
    """(forward, forward+backward) of fn(q, k, v, g, beta) -> (o, S), both jitted. The second
    returns (o, S, grads under the cotangents (dO, 1e-3)), as a training step uses them: o goes on
    to the next layer, so its kernels must run. Until 2026-12-04 it returned the gradients of
    vdot(o, dO) + 1e-3 sum(S) alone; o and S were then dead code, and XLA dropped the forward's
    output sweep (a Pallas call has no side effects), so every forward+backward time before then
    lacks the forward's sweep (docs/benchmarks.md, "The forward+backward times lacked the forward
    sweep")."""
    fwd = jax.jit(lambda *a: fn(*a)[0])

    @jax.jit
    def fwd_bwd(*a):
        (o, S), pullback = jax.vjp(fn, *a)
        grads = pullback((dO.astype(o.dtype), jnp.full(S.shape, 1e-3, S.dtype)))
        return o, S, grads
    return fwd, fwd_bwd


def time_jax(f, args, iters, per_batch=10):
    """Milliseconds per call of f: the median over batches of per_batch calls issued back to back
    (one sync per batch), so the host's dispatch and sync overlap the device's work, as they do in
    a training step; before 2026-12-03 (second session) every call was synced alone, which added
    ~0.01-0.1 ms per call."""
    jax.block_until_ready(f(*args))
    per_batch = max(1, min(per_batch, iters))
    times = []
    for _ in range(max(3, iters // per_batch)):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / per_batch)
        del out
    return statistics.median(times) * 1e3


def compile_stats(f, args):
    """(seconds to lower and compile, XLA's temp allocation in MiB, the compiled executable)."""
    t0 = time.perf_counter()
    compiled = f.lower(*args).compile()
    seconds = time.perf_counter() - t0
    try:
        mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # memory analysis is best-effort across jax versions
        mib = float("nan")
    return seconds, mib, compiled


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def reference(args, dO):
    """chunk in float32 at HIGHEST precision: (o, S, grads), the yardstick of check."""
    with jax.default_matmul_precision("highest"):
        ref_args = [a.astype(jnp.float32) for a in args]
        o_ref, S_ref = jax.jit(chunk_fn)(*ref_args)
        return o_ref, S_ref, fwd_and_grad(chunk_fn, dO)[1](*ref_args)[2]


def check(fn, args, dO, ref):
    """Relative errors of fn (bf16 inputs) against ref = reference(args, dO)."""
    o_ref, S_ref, g_ref = ref
    o, S = jax.jit(fn)(*args)
    grads = fwd_and_grad(fn, dO)[1](*args)[2]
    errs = {"o": rel(o, o_ref), "S": rel(S, S_ref)}
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip(("q", "k", "v", "g", "beta"), grads, g_ref)})
    errs["finite"] = bool(all(jnp.isfinite(x).all() for x in (o, S, *grads)))
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in errs.items()}


def check_features(impl):
    """GVA, documents inside chunks, an initial state, ragged T and non-power-of-two heads, against
    scan, forward and gradients: float32 (Triton only) and bf16 inputs."""
    ks = jax.random.split(jax.random.key(1), 8)
    B, T, H, HV, K, V = 2, 1000, 2, 4, 100, 200
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, HV, V))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, HV)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, HV)))
    S0 = jax.random.normal(ks[5], (B, HV, K, V))
    dO = jax.random.normal(ks[7], (B, T, HV, V))
    seg = jnp.cumsum(jax.random.uniform(ks[6], (B, T)) < 0.01, axis=1).astype(jnp.int32)
    out = {}
    for dtype in ((jnp.float32, jnp.bfloat16) if impl == "pallas_triton" else (jnp.bfloat16,)):
        args = (q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta, S0)

        def run(impl, grads=False):
            def f(q, k, v, g, beta, S0):
                return gated_delta_rule(q, k, v, g, beta, initial_state=S0, segment_ids=seg,
                                        output_final_state=True, impl=impl)
            if not grads:
                return jax.jit(f)(*args)
            loss = lambda *a: jnp.vdot(f(*a)[0].astype(jnp.float32), dO) + jnp.sum(f(*a)[1])
            return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)
        with jax.default_matmul_precision("highest"):
            ref, g_ref = run("scan"), run("scan", True)
        o, S = run(impl)
        grads = run(impl, True)
        errs = {"o": rel(o, ref[0]), "S": rel(S, ref[1])}
        errs.update({f"d{n}": rel(a, b) for n, a, b in zip(("q", "k", "v", "g", "beta", "S0"), grads, g_ref)})
        out[jnp.dtype(dtype).name] = {k: round(v, 7) for k, v in errs.items()}
    return out


def to_torch(args, dO):
    import torch
    to_t = lambda a, dt: torch.from_numpy(np.asarray(a.astype(jnp.float32))).to("cuda", dt)
    q, k, v = (to_t(a, torch.bfloat16).requires_grad_() for a in args[:3])
    g, beta = (to_t(a, torch.float32).requires_grad_() for a in args[3:])
    return q, k, v, g, beta, to_t(dO, torch.bfloat16)


def time_torch(fn, tensors, iters):
    """(fwd ms, fwd+bwd ms, peak MiB above the inputs) of fn(q, k, v, g, beta) -> o."""
    import torch
    from triton.testing import do_bench
    q, k, v, g, beta, do = tensors
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd = lambda: fn(q, k, v, g, beta)

    def fwd_bwd():
        fwd().backward(do)
    t_f = do_bench(fwd, warmup=50, rep=max(100, iters * 5), return_mode="median")
    t_fb = do_bench(fwd_bwd, warmup=50, rep=max(200, iters * 10), return_mode="median")
    return t_f, t_fb, (torch.cuda.max_memory_allocated() - base) / 2**20


def fla_runner():
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except Exception as e:  # FLA is optional: the table then has no FLA column
        print(f"FLA not available: {e!r}")
        return None
    # FLA 0.6.0 refuses its gated backward on Hopper with Triton 3.6 (FLA issue 640); this lets it
    # run. Its backward values are then not trusted, only its time.
    fla_chunk_o.TRITON_ABOVE_3_4_0 = False
    fn = lambda q, k, v, g, beta: fla_chunk(q, k, v, g, beta, scale=q.shape[-1] ** -0.5)[0]
    return lambda args, dO, iters: time_torch(fn, to_torch(args, dO), iters)


def flashqla_child(names, iters, out_path):
    """Runs in a child process whose path has FlashQLA + TileLang (FLA must not see TileLang)."""
    import flash_qla
    fn = lambda q, k, v, g, beta: flash_qla.chunk_gated_delta_rule(q, k, v, g, beta, scale=q.shape[-1] ** -0.5)[0]
    rows = {}
    for name in names:
        shape = SHAPES[name]
        if shape[4] != 128 or shape[5] != 128:
            continue  # FlashQLA 0.1.3 runs K = V = 128 only
        t0 = time.perf_counter()
        args, dO = make_inputs(shape)
        rows[name] = time_torch(fn, to_torch(args, dO), iters)
        print(name, "flashqla", rows[name], f"({time.perf_counter() - t0:.0f} s with its compile)", flush=True)
    with open(out_path, "w") as f:
        json.dump(rows, f)


def flashqla_rows(site, names, iters, out_dir):
    path = os.path.join(out_dir or "/tmp", "flashqla.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]),
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-u", __file__, "--flashqla-child", "--shapes", ",".join(names),
           "--iters", str(iters), "--out", os.path.dirname(path)]
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0 or not os.path.exists(path):
        print(f"FlashQLA child failed (exit {done.returncode})", flush=True)
        return {}
    with open(path) as f:
        return json.load(f)


VARIANT_KEYS = {"bv": "block_v", "bvr": "residual_block_v", "bi": "inner_block_v", "k": "block_k",
                "w": "num_warps", "s": "num_stages",
                "x": "sweep_warps", "y": "sweep_stages", "ms": "mosaic_stages", "p": "segments",
                "wg": "mosaic_warpgroups", "rw": "reverse_warpgroups", "kr": "keep_residuals",
                "mp": "mosaic_prepare", "ls": "loop_stages", "so": "split_output"}


# The backward's chunk-parallel kernels (gated_delta_rule.CHUNK_GRADS) by variant tag: the Triton pair
# and key kernels (tkg), the Triton pair kernel then the Mosaic key kernel (mkg), one fused Mosaic
# kernel (fkg).
KEY_GRAD_TAGS = {"tkg": "triton", "mkg": "mosaic", "fkg": "fused"}


def parse_variants(text):
    """Comma list of BACKEND[-KNOBS]: BACKEND is triton or mosaic (the sweeps' lowering); KNOBS e.g.
    bv64x4y2ms2p4: the sweeps' value tile (bv; bvr: the residual sweep's alone), warps (x) and
    stages (y, Triton), Mosaic pipeline
    stages (ms), warp specialisation of its forward (wg2) and reverse (rw2) sweeps, the forward
    keeping the backward's residuals (kr1), T on Mosaic (mp1), context-parallel segments (p),
    the backward's Triton pair and key kernels (tkg), the Mosaic key-gradient kernel (mkg) or the
    fused Mosaic pair + key kernel (fkg); the
    chunk-parallel kernels' inner value tile (bi),
    key tile (k), warps (w) and stages (s), the gradient kernels' value-tile loop pipelined
    (ls2, ls3; ls1 unrolled), and the forward's output formed chunk-parallel from the residual
    sweep's states, which the backward then reuses (so1, Triton). Left out: the op's defaults."""
    out = []
    for item in text.split(","):
        backend, _, knobs = item.partition("-")
        extra = {}
        for tag, key_grads in KEY_GRAD_TAGS.items():
            if tag in knobs:
                knobs, extra = knobs.replace(tag, ""), {"key_grads": key_grads}
        if backend not in ("triton", "mosaic"):
            raise SystemExit(f"--variants: backend must be triton or mosaic, got {backend!r} in {item!r}")
        nums = dict(re.findall(r"([a-z]+)(\d+)", knobs))
        unknown = set(nums) - set(VARIANT_KEYS)
        if unknown:
            raise SystemExit(f"--variants: unknown knob(s) {sorted(unknown)} in {item!r}")
        out.append((item, {"sweeps": backend, **extra, **{VARIANT_KEYS[k]: int(v) for k, v in nums.items()}}))
    return out


def breakdown(shape, launch, iters):
    """Milliseconds of each kernel of one forward+backward at this shape (bf16; K, V as the kernels
    see them: padded_head_dims(K, V) == (K, V))."""
    from kernels_pallas import gated_delta_rule as gdr
    from kernels_pallas import backward, forward, mosaic_sweeps
    (q, k, v, g, beta), dO = make_inputs(shape)
    B, T, H, HV, K, V = shape
    t = gdr.make_tiling(B=B, T=T, H=H, HV=HV, K=K, V=V, chunk_size=64, scale=K ** -0.5, has_docs=False,
                        dtype=q.dtype, **{**launch, "segments": 1})
    ch = lambda x: x.reshape(B, t.N, t.C, *x.shape[2:])
    q, k, v, g, beta, do = map(ch, (q, k, v, g, beta, dO.astype(jnp.bfloat16)))
    S0 = jnp.zeros((B, HV, K, V), jnp.float32)
    mmd = jnp.dtype(jnp.bfloat16)
    out = {}

    def timed(name, f, *args):
        f = jax.jit(f)
        try:
            out[name] = round(time_jax(f, args, iters), 3)
        except Exception as e:  # say which kernel (e.g. out of shared memory)
            raise RuntimeError(f"kernel {name!r} failed after {out}: {e!r}"[:3000]) from e
        return f(*args)

    T_ = timed("prepare T", lambda k, v, g, b: forward.prepare(k, v, g, b, (), t, mmd, t_only=True), k, v, g, beta)
    if t.sweeps == "mosaic":
        sw = lambda mode, t: lambda *a: mosaic_sweeps.sweep(*a, (), S0, t, mode=mode, out_dtype=v.dtype)
        timed("sweep output", sw("output", t), q, k, v, T_, g, beta)
        _, s_in, vn = timed("sweep residuals", sw("residuals", t.residual_tiling), q, k, v, T_, g, beta)
        ds_out, dvn, _ = timed("reverse sweep", lambda *a: mosaic_sweeps.reverse_sweep(
            *a, (), do, S0, t, mode="full"), q, k, T_, g, beta)
    else:
        timed("prepare W, U, T", lambda k, v, g, b: forward.prepare(k, v, g, b, (), t, mmd), k, v, g, beta)
        w_, u_, _ = timed("prepare W, U from T", lambda k, v, g, b, T: forward.prepare(
            k, v, g, b, (), t, mmd, T=T), k, v, g, beta, T_)
        sw = lambda mode, t: lambda *a: forward.sweep(*a, (), S0, t, mmd, mode=mode, out_dtype=v.dtype)
        if t.split_output:  # the residual sweep, then the output from its states (both kept)
            _, s_in, vn = timed("sweep residuals (kept)", sw("residuals", t.residual_tiling), q, k, w_, u_, g)
            timed("output from states", lambda q, k, g, s, vn: forward.output_from_states(
                q, k, g, (), s, vn, t, mmd, out_dtype=v.dtype), q, k, g, s_in, vn)
        elif t.keep_residuals:  # one sweep writes the output and the backward's residuals
            _, _, s_in, vn = timed("sweep output + residuals (kept)", sw("output_residuals", t),
                                   q, k, w_, u_, g)
        else:
            timed("sweep output", sw("output", t), q, k, w_, u_, g)
            _, s_in, vn = timed("sweep residuals", sw("residuals", t.residual_tiling), q, k, w_, u_, g)
        dvl = timed("local dvnew", lambda q, k, g, do: backward.local_dvnew(q, k, g, (), do, t, mmd), q, k, g, do)
        ds_out, dvn, _ = timed("reverse sweep", lambda q, k, w, g, do, dvl: backward.reverse_sweep(
            q, k, w, g, (), do, dvl, S0, t, mmd), q, k, w_, g, do, dvl)
    if t.key_grads == "fused":
        timed("pair + key grads (fused)", lambda *a: gdr.CHUNK_GRADS["fused"](
            *a[:5], (), *a[5:], t, mmd), q, k, v, g, beta, T_, do, vn, dvn, s_in, ds_out)
        return out
    tdvn, d_qk, Y, _, _ = timed("pair grads", lambda *a: backward.pair_grads(*a[:5], (), *a[5:], t, mmd),
                                q, k, v, g, beta, T_, do, vn, dvn)
    timed("key grads", lambda q, k, g, b, *a: gdr.KEY_GRADS[t.key_grads](q, k, g, b, (), *a, t, mmd),
          q, k, g, beta, d_qk, Y, s_in, ds_out, do, vn, tdvn)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="all", help=f"comma list of {list(SHAPES)} or 'all'")
    p.add_argument("--variants", default="triton,mosaic", help="see parse_variants")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--rounds", type=int, default=1,
                   help="time all variants this many times, interleaved; report the median round")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--check-all", action="store_true",
                   help="check every variant, not only the first of each backend")
    p.add_argument("--features", action="store_true",
                   help="also check GVA, documents, initial state and non-pow2 heads against scan")
    p.add_argument("--no-chunk", action="store_true", help="skip timing the plain-XLA chunk path")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--flashqla-site", default=None, help="folder with FlashQLA + TileLang unpacked")
    p.add_argument("--flashqla-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--breakdown", action="store_true", help="time each kernel of every variant")
    p.add_argument("--breakdown-only", action="store_true", help="per-kernel times only, no end-to-end")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)
    names = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    if args.flashqla_child:
        return flashqla_child(names, args.iters, os.path.join(args.out or "/tmp", "flashqla.json"))
    variants = parse_variants(args.variants)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    if args.features:
        for backend in dict.fromkeys(v[1]["sweeps"] for v in variants):
            try:
                print(f"pallas_{backend} vs scan (GVA, documents, initial state, T=1000, K=100, V=200):",
                      check_features(f"pallas_{backend}"), flush=True)
            except Exception as e:
                print(f"pallas_{backend} feature check FAILED:", repr(e)[:2000], flush=True)
    qla = flashqla_rows(args.flashqla_site, names, args.iters, args.out) if args.flashqla_site else {}
    fla = None if args.no_fla else fla_runner()
    rows = []
    for name in names:
        shape = {**SHAPES, **SMOKE, **PADDED}[name]
        inputs, dO = make_inputs(shape)
        row = {"shape": name, "dims": shape, "errors": {}, "compile_s": {}, "spread": {}}
        checked, ref, timers = set(), None, {}
        for vname, launch in variants:
            try:  # one variant failing to compile (e.g. out of registers) must not end the run
                if not args.no_check and (args.check_all or launch["sweeps"] not in checked):
                    checked.add(launch["sweeps"])
                    ref = ref if ref is not None else reference(inputs, dO)
                    row["errors"][vname] = check(pallas_fn(**launch), inputs, dO, ref)
                    print(name, vname, "errors vs f32 chunk:", row["errors"][vname], flush=True)
                if (args.breakdown or args.breakdown_only) and padded_head_dims(*shape[4:]) == shape[4:]:
                    print(name, vname, "breakdown ms:", breakdown(shape, launch, args.iters), flush=True)
                if args.breakdown_only:
                    continue
                fwd, grad = fwd_and_grad(pallas_fn(**launch), dO)
                seconds, mib, grad = compile_stats(grad, inputs)
                row["compile_s"][vname] = round(seconds, 1)
                timers[vname] = (fwd, grad, mib)
            except Exception as e:
                print(name, vname, "FAILED:", repr(e)[:3000], flush=True)
        # Interleaved rounds: the machine drifts by ~10% over a run, so every variant is timed once
        # per round and each reports the median over rounds, with the rounds' spread.
        times = {vname: [] for vname in timers}
        for r in range(args.rounds):
            for vname, (fwd, grad, mib) in timers.items():
                try:
                    times[vname].append((time_jax(fwd, inputs, args.iters), time_jax(grad, inputs, args.iters)))
                except Exception as e:
                    print(name, vname, "FAILED:", repr(e)[:3000], flush=True)
                    continue
                if r == args.rounds - 1:
                    fs, gs = zip(*times[vname])
                    row[vname] = (statistics.median(fs), statistics.median(gs), mib)
                    row["spread"][vname] = round((max(gs) - min(gs)) / statistics.median(gs), 3)
                    print(name, vname, row[vname], f"compile {row['compile_s'][vname]:.1f} s, "
                          f"fwd+bwd over {len(gs)} rounds {min(gs):.3f}-{max(gs):.3f}", flush=True)
        if not args.no_chunk:
            fwd, grad = fwd_and_grad(chunk_fn, dO)
            row["chunk"] = (time_jax(fwd, inputs, args.iters), time_jax(grad, inputs, args.iters),
                            compile_stats(grad, inputs)[1])
            print(name, "chunk", row["chunk"], flush=True)
        if fla is not None:
            row["fla"] = fla(inputs, dO, args.iters)
            print(name, "fla", row["fla"], flush=True)
        if name in qla:
            row["flashqla"] = qla[name]
        rows.append(row)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
            json.dump(rows, f, indent=1, default=str)
    print_table(rows, [v[0] for v in variants])


def print_table(rows, variant_names):
    print("\nshape        impl              fwd ms  fwd+bwd ms  peak MiB  compile s   vs chunk  vs FLA (fwd)  vs FlashQLA (fwd)")
    for row in rows:
        for key in [*variant_names, "chunk", "fla", "flashqla"]:
            if key not in row:
                continue
            f_ms, fb_ms, mem = row[key]
            ratios = ""
            if key in variant_names:
                ratios += f"  {row['compile_s'].get(key, float('nan')):9.1f}"
                for ref in ("chunk", "fla", "flashqla"):
                    if ref in row:
                        ratios += f"  {row[ref][1] / fb_ms:6.2f}x ({row[ref][0] / f_ms:.2f}x)"
            print(f"{row['shape']:12s} {key:16s} {f_ms:8.3f} {fb_ms:10.3f} {mem:9.0f}{ratios}")


if __name__ == "__main__":
    main()
