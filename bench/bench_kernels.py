"""Checks and times the gated delta rule on one GPU: pallas (each tiling variant), chunk (plain XLA), FLA.

    python bench/bench_kernels.py [--shapes all] [--variants bv64w4,bv32w4] [--iters 30] [--out DIR]

For each shape (B, T, H, K, V) in bf16 it
  1. checks pallas against the chunk path run in float32 at HIGHEST precision (forward output, final
     state, and all five input gradients under a random cotangent), printing relative errors;
  2. times forward and forward+backward (median over --iters after warm-up) for every pallas variant,
     for chunk, and for FLA's chunk_gated_delta_rule when torch and fla are importable;
  3. reports peak extra device memory: XLA's temp allocation for the jitted function, and for FLA
     torch's max_memory_allocated above the inputs.
The last lines are a table with the ratios chunk/pallas and FLA/pallas (above 1 means pallas is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gdn_jax.chunked import chunk_gated_delta_rule  # noqa: E402
from gdn_jax.ops import gated_delta_rule  # noqa: E402
from kernels_pallas import pallas_gated_delta_rule  # noqa: E402

SHAPES = {
    "h16k128": (4, 4096, 16, 128, 128),
    "h6k256v512": (2, 4096, 6, 256, 512),
    "t16k": (1, 16384, 16, 128, 128),
    "paper1.3b": (4, 4096, 9, 200, 400),
}
SMOKE = {"tiny": (1, 128, 2, 32, 32)}  # for trying the script itself (CPU, interpret mode)
PADDED = {"paper1.3b_padded": (4, 4096, 9, 256, 512)}  # what the kernels see of paper1.3b


def make_inputs(shape, seed=0, dtype=jnp.bfloat16):
    B, T, H, K, V = shape
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, H, V), jnp.float32)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H), jnp.float32))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H), jnp.float32))
    dO = jax.random.normal(ks[5], (B, T, H, V), jnp.float32)
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta), dO


def pallas_fn(**tiling):
    """The pallas op with launch parameters `tiling` (block_v, block_k, num_warps, num_stages,
    sweep_warps, split_output; missing ones take the op's defaults)."""
    def f(q, k, v, g, beta):
        B, T, H, K = q.shape
        return pallas_gated_delta_rule(
            q, k, v, g, beta, scale=K ** -0.5, initial_state=jnp.zeros((B, H, K, v.shape[-1]), jnp.float32),
            reset=None, chunk_size=64, **tiling)
    return f


def chunk_fn(q, k, v, g, beta):
    B, T, H, K = q.shape
    return chunk_gated_delta_rule(q, k, v, g, beta, scale=K ** -0.5,
                                  initial_state=jnp.zeros((B, H, K, v.shape[-1]), jnp.float32),
                                  reset=None, chunk_size=64)


def fwd_and_grad(fn, dO):
    fwd = jax.jit(lambda *a: fn(*a)[0])

    def loss(*a):
        o, S = fn(*a)
        return jnp.vdot(o.astype(jnp.float32), dO) + 1e-3 * jnp.sum(S)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    return fwd, grad


def time_jax(f, args, iters):
    out = f(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def temp_mib(f, args):
    try:
        mem = f.lower(*args).compile().memory_analysis()
        return mem.temp_size_in_bytes / 2**20
    except Exception:  # memory analysis is best-effort across jax versions
        return float("nan")


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def check(fn, args, dO):
    """Relative errors of fn (bf16 inputs) against chunk in float32 at HIGHEST precision."""
    with jax.default_matmul_precision("highest"):
        ref_args = [a.astype(jnp.float32) for a in args]
        o_ref, S_ref = jax.jit(chunk_fn)(*ref_args)
        g_ref = fwd_and_grad(chunk_fn, dO)[1](*ref_args)
    o, S = jax.jit(fn)(*args)
    grads = fwd_and_grad(fn, dO)[1](*args)
    errs = {"o": rel(o, o_ref), "S": rel(S, S_ref)}
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip(("q", "k", "v", "g", "beta"), grads, g_ref)})
    errs["finite"] = bool(all(jnp.isfinite(x).all() for x in (o, S, *grads)))
    return errs


def check_features():
    """GVA, documents inside chunks, initial state, ragged T and non-power-of-two heads, vs scan."""
    ks = jax.random.split(jax.random.key(1), 7)
    B, T, H, HV, K, V = 2, 1000, 2, 4, 100, 200
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, HV, V))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, HV)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, HV)))
    S0 = jax.random.normal(ks[5], (B, HV, K, V))
    seg = jnp.cumsum(jax.random.uniform(ks[6], (B, T)) < 0.01, axis=1).astype(jnp.int32)
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        args = (q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta)
        run = lambda impl: jax.jit(lambda *a: gated_delta_rule(
            *a, initial_state=S0, segment_ids=seg, output_final_state=True, impl=impl))(*args)
        with jax.default_matmul_precision("highest"):
            o_ref, S_ref = run("scan")
        o, S = run("pallas")
        out[jnp.dtype(dtype).name] = {"o": rel(o, o_ref), "S": rel(S, S_ref)}
    return out


def fla_runner():
    try:
        import torch
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except Exception as e:  # FLA is optional: the table then has no FLA column
        print(f"FLA not available: {e!r}")
        return None
    # FLA 0.6.0 refuses its gated backward on Hopper with Triton 3.6 (FLA issue 640); this lets it
    # run. Its backward values are then not trusted, only its time.
    fla_chunk_o.TRITON_ABOVE_3_4_0 = False
    from triton.testing import do_bench

    def run(args, dO, iters):
        to_t = lambda a, dt: torch.from_numpy(np.asarray(a.astype(jnp.float32))).to("cuda", dt)
        q, k, v = (to_t(a, torch.bfloat16).requires_grad_() for a in args[:3])
        g, beta = (to_t(a, torch.float32).requires_grad_() for a in args[3:])
        do = to_t(dO, torch.bfloat16)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd = lambda: fla_chunk(q, k, v, g, beta, scale=q.shape[-1] ** -0.5)[0]

        def fwd_bwd():
            fwd().backward(do)
        t_f = do_bench(fwd, warmup=50, rep=max(100, iters * 5), return_mode="median")
        t_fb = do_bench(fwd_bwd, warmup=50, rep=max(200, iters * 10), return_mode="median")
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return t_f, t_fb, peak
    return run


def breakdown(shape, tiling, iters):
    """Milliseconds of each kernel of one forward+backward at this shape (bf16; K, V powers of two)."""
    from kernels_pallas import backward, forward
    from kernels_pallas.gated_delta_rule import make_tiling
    (q, k, v, g, beta), dO = make_inputs(shape)
    B, T, H, K, V = shape
    t = make_tiling(B=B, T=T, H=H, HV=H, K=K, V=V, chunk_size=64, scale=K ** -0.5, has_docs=False,
                    **tiling)
    N, C = t.N, t.C
    ch = lambda x: x.reshape(B, N, C, *x.shape[2:])
    q, k, v, g, beta, do = map(ch, (q, k, v, g, beta, dO.astype(jnp.bfloat16)))
    S0 = jnp.zeros((B, H, K, V), jnp.float32)
    mmd = jnp.dtype(jnp.bfloat16)
    prep = jax.jit(lambda k, v, g, beta: forward.prepare(k, v, g, beta, (), t, mmd))
    w_, u_, T_ = prep(k, v, g, beta)
    prep_T = jax.jit(lambda k, v, g, beta, T: forward.prepare(k, v, g, beta, (), t, mmd, T=T))
    sweep_o = jax.jit(lambda *a: forward.sweep(*a, (), S0, t, mmd, out_dtype=v.dtype, residuals=False)[:2])
    sweep_r = jax.jit(lambda *a: forward.sweep(*a, (), S0, t, mmd, out_dtype=v.dtype, residuals=True)[1:])
    _, s_in, vn = sweep_r(q, k, w_, u_, g)
    out_k = jax.jit(lambda q, k, g, s_in, vn: forward.output(q, k, g, (), s_in, vn, t, mmd, out_dtype=v.dtype))
    loc = jax.jit(lambda q, k, g, do: backward.local_dvnew(q, k, g, (), do, t, mmd))
    dvl = loc(q, k, g, do)
    rev = jax.jit(lambda q, k, w, g, do, dvl: backward.reverse_sweep(q, k, w, g, (), do, dvl, S0, t, mmd))
    ds_out, dvn, _ = rev(q, k, w_, g, do, dvl)
    pair = jax.jit(lambda q, k, v, g, beta, T, do, vn, dvn: backward.pair_grads(
        q, k, v, g, beta, (), T, do, vn, dvn, t, mmd))
    tdvn, d_qk, Y, _, _ = pair(q, k, v, g, beta, T_, do, vn, dvn)
    keys = jax.jit(lambda q, k, g, beta, *a: backward.key_grads(q, k, g, beta, (), *a, t, mmd))
    out = {"prepare": time_jax(prep, (k, v, g, beta), iters),
           "prepare from T": time_jax(prep_T, (k, v, g, beta, T_), iters),
           "sweep+output": time_jax(sweep_o, (q, k, w_, u_, g), iters),
           "sweep residuals": time_jax(sweep_r, (q, k, w_, u_, g), iters),
           "output": time_jax(out_k, (q, k, g, s_in, vn), iters),
           "local dvnew": time_jax(loc, (q, k, g, do), iters),
           "reverse sweep": time_jax(rev, (q, k, w_, g, do, dvl), iters),
           "pair grads": time_jax(pair, (q, k, v, g, beta, T_, do, vn, dvn), iters),
           "key grads": time_jax(keys, (q, k, g, beta, d_qk, Y, s_in, ds_out, do, vn, tdvn), iters)}
    return {k: round(v, 3) for k, v in out.items()}


VARIANT_KEYS = {"bv": "block_v", "bi": "inner_block_v", "k": "block_k", "w": "num_warps", "s": "num_stages",
                "x": "sweep_warps", "y": "sweep_stages"}


def parse_variants(text):
    """'default' or e.g. bv32bi64k64w4s1x4y2o0: the sweeps' block_v 32, 4 warps (x) and 2 stages (y);
    the chunk-parallel kernels' inner value tile 64 (bi), key tile 64 (k), 4 warps (w) and 1 stage (s);
    o1 splits the output out of the forward sweep (o0: fused). Left out: the op's defaults."""
    out = []
    for item in text.split(","):
        nums = dict(re.findall(r"([a-z]+)(\d+)", item))
        tiling = {VARIANT_KEYS[k]: int(v) for k, v in nums.items() if k in VARIANT_KEYS}
        if "o" in nums:
            tiling["split_output"] = bool(int(nums["o"]))
        unknown = set(nums) - set(VARIANT_KEYS) - {"o"}
        if unknown:
            raise SystemExit(f"--variants: unknown key(s) {sorted(unknown)} in {item!r}")
        out.append((item, tiling))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="all", help=f"comma list of {list(SHAPES)} or 'all'")
    p.add_argument("--variants", default="default", help="pallas tilings, e.g. bv32bi64k64w4s1x4y2o0 (see parse_variants)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--no-chunk", action="store_true", help="skip timing the plain-XLA chunk path")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--breakdown", action="store_true", help="time each kernel of every variant")
    p.add_argument("--breakdown-only", action="store_true", help="per-kernel times only, no end-to-end")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args()
    names = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    variants = parse_variants(args.variants)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    if not args.no_check:
        print("features vs scan (GVA, documents, initial state, T=1000, K=100, V=200):", check_features(),
              flush=True)
    fla = None if args.no_fla else fla_runner()
    rows = []
    for name in names:
        shape = {**SHAPES, **SMOKE, **PADDED}[name]
        inputs, dO = make_inputs(shape)
        row = {"shape": name, "dims": shape}
        if not args.no_check:
            row["errors"] = check(pallas_fn(**variants[0][1]), inputs, dO)
            print(name, "errors vs f32 chunk:", row["errors"], flush=True)
        for vname, tiling in variants:
            try:  # one variant failing to compile (e.g. out of registers) must not end the run
                if args.breakdown and all(d & (d - 1) == 0 for d in shape[3:]):  # kernels need 2^n dims
                    print(name, vname, "breakdown ms:", breakdown(shape, tiling, args.iters), flush=True)
                if args.breakdown_only:
                    continue
                fwd, grad = fwd_and_grad(pallas_fn(**tiling), dO)
                row[f"pallas_{vname}"] = (time_jax(fwd, inputs, args.iters),
                                          time_jax(grad, inputs, args.iters), temp_mib(grad, inputs))
                print(name, vname, row[f"pallas_{vname}"], flush=True)
            except Exception as e:
                print(name, vname, "FAILED:", repr(e)[:2000], flush=True)
        if not args.no_chunk:
            fwd, grad = fwd_and_grad(chunk_fn, dO)
            row["chunk"] = (time_jax(fwd, inputs, args.iters), time_jax(grad, inputs, args.iters),
                            temp_mib(grad, inputs))
            print(name, "chunk", row["chunk"], flush=True)
        if fla is not None:
            row["fla"] = fla(inputs, dO, args.iters)
            print(name, "fla", row["fla"], flush=True)
        rows.append(row)
    if args.out:
        with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
            json.dump(rows, f, indent=1, default=str)

    print("\nshape        impl            fwd ms   fwd+bwd ms   peak MiB   chunk/pallas  FLA/pallas (fwd+bwd)")
    for row in rows:
        timed = [k for k in row if k.startswith("pallas_")]
        best = min(timed, key=lambda k: row[k][1]) if timed else None
        for key in [k for k in row if k.startswith("pallas_")] + ["chunk", "fla"]:
            if key not in row:
                continue
            f_ms, fb_ms, mem = row[key]
            ratios = ""
            if key == best:
                if "chunk" in row:
                    ratios += f"  {row['chunk'][1] / fb_ms:10.2f}x"
                if "fla" in row:
                    ratios += f"  {row['fla'][1] / fb_ms:10.2f}x (fwd {row['fla'][0] / f_ms:.2f}x)"
            print(f"{row['shape']:12s} {key:14s} {f_ms:8.3f} {fb_ms:12.3f} {mem:10.0f}{ratios}")


if __name__ == "__main__":
    main()
