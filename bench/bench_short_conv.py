"""The GDN short conv with SiLU, forward and forward+backward: ShortConv's jax.numpy path ("xla")
against the Pallas kernels ("pallas", kernels_pallas/short_conv.py), checked, then timed.

    python3 bench/bench_short_conv.py                                   # GPU: fla_gdn_1.3b's convs
    python3 bench/bench_short_conv.py --rows 256 --channels 64 --iters 2   # CPU (interpret mode)

Inputs as in a training step: x [B, T, C] bf16 with segment ids (one document a row, as
bench/train_throughput.py feeds), float32 weights [4, C], a random bf16 cotangent. The check
compares y, dx and dw of "pallas" with "xla" (max abs difference over max abs value). The floor is
the bytes each pass must move at the bandwidth of a device copy measured here: forward x in and y
out (bf16); forward+backward that plus x and dy in and dx out.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

IMPLS = ("xla", "pallas")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="4x4096", help="B x T (fla_gdn_1.3b's training batch)")
    p.add_argument("--channels", default="1536,3072", help="conv widths (q/k and v of fla_gdn_1.3b)")
    p.add_argument("--iters", type=int, default=50, help="timed calls (median of batches of 10)")
    args = p.parse_args(argv)
    try:
        B, T = (int(n) for n in args.rows.split("x")) if "x" in args.rows else (1, int(args.rows))
        args.channels = [int(c) for c in args.channels.split(",") if c]
    except ValueError:
        p.error(f"--rows must be BxT or T and --channels a comma list of integers, got "
                f"{args.rows!r}, {args.channels!r}")
    if min(B, T, *args.channels) < 1 or args.iters < 1:
        p.error("--rows, --channels and --iters must be positive")
    args.B, args.T = B, T
    return args


def passes(impl, C):
    """(forward, forward+backward) jitted functions of (x, segment_ids, dy) for one ShortConv."""
    import jax
    from flax import nnx

    from gdn_jax.layers.conv import ShortConv

    graph, params = nnx.split(ShortConv(C, 4, std=0.3, impl=impl, rngs=nnx.Rngs(0)))
    f = lambda x, p, seg: nnx.merge(graph, p)(x, segment_ids=seg)[0]
    fwd = jax.jit(lambda x, seg, dy: f(x, params, seg))

    @jax.jit
    def fwd_bwd(x, seg, dy):
        y, vjp = jax.vjp(lambda a, p: f(a, p, seg), x, params)
        dx, dp = vjp(dy)
        return y, dx, dp["weight"][...]

    return fwd, fwd_bwd


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from bench_kernels import time_jax
    from generate_throughput import measure_bandwidth

    bandwidth = measure_bandwidth(smoke=jax.default_backend() != "gpu")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s; rows {args.B} x {args.T}")
    print(f"{'C':>6} {'impl':<8}{'check (y, dx, dw)':<30}{'fwd ms':>9}{'fwd+bwd ms':>12}"
          f"{'floor fwd':>11}{'floor f+b':>11}")
    for C in args.channels:
        ks = jax.random.split(jax.random.key(C), 2)
        x = jax.random.normal(ks[0], (args.B, args.T, C), jnp.bfloat16)
        dy = jax.random.normal(ks[1], (args.B, args.T, C), jnp.bfloat16)
        seg = jnp.ones((args.B, args.T), jnp.int32)
        nbytes = x.size * x.dtype.itemsize
        floors = (2 * nbytes / bandwidth * 1e3, 5 * nbytes / bandwidth * 1e3)
        funcs = {impl: passes(impl, C) for impl in IMPLS}
        want = funcs["xla"][1](x, seg, dy)
        for impl, (fwd, fwd_bwd) in funcs.items():
            got = fwd_bwd(x, seg, dy)
            errs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))
                         / jnp.max(jnp.abs(w.astype(jnp.float32)))) for g, w in zip(got, want)]
            finite = all(bool(jnp.all(jnp.isfinite(g))) for g in got)
            check = " ".join(f"{e:.1e}" for e in errs) + ("" if finite else " NON-FINITE")
            t_f = time_jax(fwd, (x, seg, dy), args.iters)
            t_fb = time_jax(fwd_bwd, (x, seg, dy), args.iters)
            print(f"{C:>6} {impl:<8}{check:<30}{t_f:9.3f}{t_fb:12.3f}{floors[0]:11.3f}"
                  f"{floors[1]:11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
