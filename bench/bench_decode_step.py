"""One decoding token's recurrence, alone: the XLA step against the Pallas decode kernel.

    python3 bench/bench_decode_step.py                       # GPU: every shape and batch below
    python3 bench/bench_decode_step.py --shapes tiny --batches 1,2 --iters 2   # CPU (interpret mode)

For each layer shape and batch B: both steps' outputs and new states are compared (max abs
difference, float32), then each is timed as 21 calls in a row (a 1.3B model's layers; the state
donated and carried from call to call, as the decode loop does), median of --iters. The floor is
the state's bytes read and written once per call (B x HV x K x V x 4 bytes, twice) over the
bandwidth of a device copy measured here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # name: (H, HV, K, V)
    "fla1.3b": (6, 6, 256, 512),
    "paper1.3b": (9, 9, 200, 400),
    "qwen3next": (16, 32, 128, 128),
    "tiny": (2, 4, 16, 24),
}
LAYERS = 21
STEPS = ("xla", "pallas")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="fla1.3b,paper1.3b,qwen3next", help=f"of {list(SHAPES)}")
    p.add_argument("--batches", default="1,16,64,256", help="batch sizes")
    p.add_argument("--iters", type=int, default=20, help="timed repetitions (median)")
    args = p.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shapes {bad}; known: {list(SHAPES)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error(f"--batches must be a comma list of integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1:
        p.error(f"--batches must be positive integers, got {args.batches}")
    if args.iters < 1:
        p.error(f"--iters must be >= 1, got {args.iters}")
    return args


def inputs(B, H, HV, K, V):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(B * 7919 + K), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (B, H, K))).astype(jnp.bfloat16)
    k = unit(jax.random.normal(ks[1], (B, H, K))).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, HV, V), jnp.bfloat16)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, HV)) + 2).astype(jnp.bfloat16)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, HV))).astype(jnp.bfloat16)
    S = jax.random.normal(ks[5], (B, HV, K, V), jnp.float32)
    return (q, k, v, g, beta), S


def layers_fn(impl):
    """21 steps in a row on one state (the decode loop's layers, here all of one shape)."""
    import jax

    from gdn_jax.ops import decode_recurrence

    def run(xs, S):
        o = None
        for _ in range(LAYERS):
            o, S = decode_recurrence(*xs, S, impl=impl)
        return o, S

    return jax.jit(run, donate_argnums=1)


def main(argv=None):
    import jax
    import jax.numpy as jnp
    import numpy as np

    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from generate_throughput import measure_bandwidth

    bw = measure_bandwidth(smoke=jax.default_backend() != "gpu")
    print(f"{jax.devices()[0].device_kind} | jax {jax.__version__} | copy bandwidth {bw / 1e12:.2f} "
          f"TB/s | {LAYERS} steps per timing, median of {args.iters}", flush=True)
    rows = []
    for name in args.shapes:
        H, HV, K, V = SHAPES[name]
        for B in args.batches:
            xs, S = inputs(B, H, HV, K, V)
            ref = None
            times = {}
            for impl in STEPS:
                fn = layers_fn(impl)
                o, S1 = fn(xs, S.copy())
                if ref is None:
                    ref = (np.asarray(o, np.float32), np.asarray(S1))
                else:
                    err_o = float(np.max(np.abs(np.asarray(o, np.float32) - ref[0])))
                    err_S = float(np.max(np.abs(np.asarray(S1) - ref[1])))
                    print(f"{name} B={B} {impl} vs xla after {LAYERS} steps: max |do| {err_o:.2e}, "
                          f"max |dS| {err_S:.2e}", flush=True)
                    if not (err_S < 1e-3 and err_o < 5e-2):
                        raise SystemExit(f"{name} B={B}: {impl} disagrees with xla")
                state = S1
                samples = []
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    o, state = fn(xs, state)
                    state.block_until_ready()
                    samples.append(time.perf_counter() - t0)
                times[impl] = statistics.median(samples) / LAYERS
            floor = 2 * B * HV * K * V * 4 / bw
            rows.append((name, B, times, floor))
            print(f"{name} B={B}: " + ", ".join(f"{i} {1e6 * t:.1f} us" for i, t in times.items())
                  + f", floor {1e6 * floor:.1f} us", flush=True)
    print("\n| shape | B | " + " | ".join(f"{i} us/layer" for i in STEPS)
          + " | floor us | xla / pallas |")
    print("|---|---|" + "---|" * (len(STEPS) + 2))
    for name, B, times, floor in rows:
        print(f"| {name} | {B} | " + " | ".join(f"{1e6 * times[i]:.1f}" for i in STEPS)
              + f" | {1e6 * floor:.1f} | {times['xla'] / times['pallas']:.2f} |")


if __name__ == "__main__":
    main()
