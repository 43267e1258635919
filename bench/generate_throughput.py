"""Generation speed: decode ms per token and tokens/s, prefill tokens/s, the memory floor, and FLA.

    python bench/generate_throughput.py                                  # both presets, 1 GPU
    python bench/generate_throughput.py --configs fla_gdn_1.3b --batches 1,64 --variants loop,fused
    python bench/generate_throughput.py --smoke                          # tiny presets, on a CPU

Random weights, random prompt tokens, greedy decoding, no EOS, so every row runs every step.
Decode rows (B in --batches, prompt --prompt tokens, --new new tokens), one per variant:
  loop    generate(): the inference copy (weights cast once to bf16) with unfused projections
          (for_inference(fuse=False)), prefill compiled once, the token loop compiled once
          (lax.while_loop).
  fused   the same with fused projections (for_inference's default, so what generate() and eval
          run): one matmul per group of projections.
  stream  fused with a no-op streaming callback on every token (the callback's cost).
  pdec    fused with each GDN layer's recurrence in the Pallas decode kernel
          (for_inference(decode_impl="pallas"), kernels_pallas/decode.py) instead of XLA's.
  python  before issue 11: float32 parameters, one jitted decode_step dispatched from Python per token.
  A suffix -sK (loop-s8, fused-s8) tests the stop condition every K steps instead of every step
  (generate(check_every=K): on a GPU each test is a device-to-host read of the loop predicate).
  "ms/token" is the token loop alone (N - 1 steps after prefill; for python, its N - 1 dispatches);
  tokens/s = B / that. "generate()" is the whole call (validation, prefill, loop) over N tokens.
  "floor" is the memory floor of one step: the bytes it must move at least, over the bandwidth. Bytes:
  every weight the step reads, in the inference dtype (the head and all projections; B rows of
  the embedding table), plus every cache array read and written (attention keys/values: read,
  one slot written). Bandwidth: a 4 GiB device copy measured here (best of 10), or --bandwidth
  (3.0e12 was the issue's H100 figure).
Prefill rows (B = 1, P in --prefill): tokens/s of the compiled prefill (all layers over P tokens,
  GDN through gated_delta_rule's chunked path, Pallas on a GPU; logits of the last position only).
  "floor" there is the compute floor: forward FLOPs (gdn_jax.model.flops_per_token / 3) at the
  device's peak bf16 FLOP/s.
FLA (when torch and fla import, on a GPU): GatedDeltaNetForCausalLM on the same config with random
  weights in bf16, timed in the same run: generate(use_cache=True, greedy), ms/token =
  (t(N new) - t(1 new)) / (N - 1); prefill = forward(use_cache=True, logits_to_keep=1).
  "FLA/ours" above 1 means ours is faster.
--profile DIR traces one token loop per (config, variant, B) and prints device time per op group and
token (bench/profile_summary.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (FLA) shares the GPU
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SMOKE = dict(configs="tiny,tiny_h1", batches="1,4", prompt=16, new=8, prefill="64,128", iters=1)


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", default="fla_gdn_1.3b,gdn_1.3b", help="model presets, comma list")
    p.add_argument("--variants", default="loop,loop-s8,fused,fused-s8,stream,python",
                   help="comma list of loop, fused, stream, pdec, python; -sK suffix: check_every=K")
    p.add_argument("--batches", default="1,16,64,256", help="decode batch sizes")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens of the decode rows")
    p.add_argument("--new", type=int, default=128, help="new tokens per decode row")
    p.add_argument("--prefill", default="4096,32768",
                   help="prompt lengths of the prefill rows ('' for none)")
    p.add_argument("--iters", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--dtype", default=None, help="inference dtype (default: the preset's, bf16)")
    p.add_argument("--gdn_impl", default=None, help="gated_delta_rule impl (default: auto)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="bytes/s for the floor (default: measured here)")
    p.add_argument("--no-fla", dest="fla", action="store_false", help="skip FLA's model")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="trace each variant's decode loop into DIR and print its summary")
    p.add_argument("--jax_cache", default=None, metavar="DIR",
                   help="persistent compilation cache (saves compile time across runs)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny run for a CPU; defaults become {SMOKE}")
    argv = sys.argv[1:] if argv is None else argv
    if "--smoke" in argv:
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if split_variant(v)[0] not in ("loop", "fused", "stream", "pdec", "python")
           or (split_variant(v)[0] == "python" and split_variant(v)[1] != 1)]
    if bad:
        p.error(f"unknown variants {bad}")
    args.batches, args.prefill = _ints(args.batches), _ints(args.prefill)
    for name in ("batches", "prefill"):
        if any(n < 1 for n in getattr(args, name)):
            p.error(f"--{name} must be positive integers, got {getattr(args, name)} "
                    f"({'leave it empty for no prefill rows' if name == 'prefill' else 'B >= 1'})")
    return args


def split_variant(name):
    """'fused-s8' -> ('fused', 8); 'loop' -> ('loop', 1)."""
    base, _, k = name.partition("-s")
    return base, int(k) if k.isdigit() else (1 if not k else -1)


def median_time(fn, iters):
    """Median wall seconds of fn() (which blocks until its work is done) after one untimed call."""
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(smoke):
    """Bytes/s of a device copy y = x + 1 (reads and writes every byte once), the best of 10.

    4 GiB each way: on an H200 a 1 GiB copy read 1.7-2.9 TB/s from run to run (median of 5) where
    4 GiB read 3.1-3.4 (2026-12-03), and an underestimate here is an overestimate of the floor."""
    import jax
    import jax.numpy as jnp

    n = (1 << 20) if smoke else (1 << 30)
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda x: x + 1)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    del x
    return 2 * 4 * n / best


def floor_bytes(model, tokens, N):
    """Bytes one decode step of the inference copy `model` moves at least, after a prompt `tokens`
    [B, P] with N new tokens to come (see the module docstring)."""
    import jax
    import numpy as np
    from flax import nnx
    from gdn_jax import generate as G

    nbytes = lambda x: int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    graphdef, state = nnx.split(model)
    _, cache, _ = jax.eval_shape(
        lambda s, t: G.prefill(graphdef, s, t, None, jax.random.key(0), cache_len=t.shape[1] + N,
                               temperature=0.0, top_k=None, top_p=None), state, tokens)
    table = model.embedding[...]
    weights = sum(nbytes(x) for x in jax.tree.leaves(state)) - nbytes(table)
    weights += tokens.shape[0] * table.shape[1] * table.dtype.itemsize
    moved = 0
    for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]:
        if getattr(path[-1], "key", None) in ("k", "v", "valid"):  # all slots read, one written
            moved += nbytes(x) + nbytes(x) // x.shape[1]
        else:
            moved += 2 * nbytes(x)
    return weights + moved


class Ours:
    """Timings of one inference model (or the training model, for the python variant)."""

    def __init__(self, model, variant):
        import jax
        from flax import nnx

        self.model = model
        self.variant, self.check_every = split_variant(variant)
        self.graphdef, self.state = nnx.split(model)
        self.key = jax.random.key(0)

    def _prefill(self, tokens, N):
        from gdn_jax import generate as G

        return G.prefill(self.graphdef, self.state, tokens, None, self.key, cache_len=tokens.shape[1] + N,
                         temperature=0.0, top_k=None, top_p=None)

    def _loop(self, first, cache, rng, N):
        import jax.numpy as jnp
        from gdn_jax import generate as G

        if self.variant == "python":
            tok = first
            for _ in range(N - 1):
                tok, _, cache = G.decode_step(self.graphdef, self.state, cache, tok, rng,
                                              temperature=0.0, top_k=None, top_p=None)
            return tok.block_until_ready()
        with G.streaming((lambda i, t: None) if self.variant == "stream" else None) as sid:
            out, _, _ = G.decode_loop(self.graphdef, self.state, cache, first, rng, sid,
                                      jnp.asarray(N, jnp.int32), capacity=G.loop_capacity(N),
                                      temperature=0.0, top_k=None, top_p=None, eos_id=None,
                                      stream=self.variant == "stream",
                                      check_every=self.check_every)
            return out.block_until_ready()

    def decode(self, tokens, N, iters, profile_dir=None):
        """(loop seconds per token, generate() seconds per token or None)."""
        import jax
        from gdn_jax.generate import generate

        first, cache, rng = self._prefill(tokens, N)
        times = []
        for i in range(iters + 1):
            jax.block_until_ready((first, cache))
            t0 = time.perf_counter()
            self._loop(first, cache, rng, N)
            if i:
                times.append(time.perf_counter() - t0)
            first, cache, rng = self._prefill(tokens, N)
        if profile_dir:
            sys.path.insert(0, os.path.join(ROOT, "bench"))
            from profile_summary import summarize

            jax.block_until_ready(cache)
            with jax.profiler.trace(profile_dir):
                self._loop(first, cache, rng, N)
            print(summarize(profile_dir, steps=N - 1), flush=True)
        gen = None
        if self.variant != "python":
            cb = (lambda i, t: None) if self.variant == "stream" else None
            # At least three calls, so that the median is not the mean of two: one slow call read
            # 4.39 against 2.60 ms/token for the same model in the run of 2026-12-03.
            gen = median_time(lambda: generate(self.model, tokens, max_new_tokens=N, temperature=0.0,
                                               callback=cb, check_every=self.check_every
                                               ).block_until_ready(), max(3, iters)) / N
        return statistics.median(times) / (N - 1), gen

    def prefill_seconds(self, tokens, iters):
        import jax

        return median_time(lambda: jax.block_until_ready(self._prefill(tokens, 1)), iters)


class FLA:
    """FLA's GatedDeltaNetForCausalLM with the preset's sizes, random weights, bf16, on CUDA."""

    def __init__(self, cfg):
        import torch
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

        if set(cfg.mixers) != {"G"}:
            raise ValueError(f"only pure GDN presets map to FLA's model, not {cfg.layer_pattern!r}")
        config = GatedDeltaNetConfig(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers, num_heads=cfg.gdn_num_heads,
            num_v_heads=cfg.gdn_num_v_heads, head_dim=cfg.gdn_head_dim, expand_v=cfg.gdn_expand_v,
            conv_size=cfg.gdn_conv_size, allow_neg_eigval=cfg.gdn_allow_neg_eigval,
            intermediate_size=cfg.mlp_hidden, vocab_size=cfg.vocab_size, norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=1 << 20)
        self.torch = torch
        with torch.device("cuda"):
            self.model = GatedDeltaNetForCausalLM(config).to(torch.bfloat16).eval()
        self.vocab = cfg.vocab_size

    def _timed(self, fn, iters):
        def run():
            fn()
            self.torch.cuda.synchronize()
        return median_time(run, iters)

    def decode(self, B, P, N, iters):
        torch = self.torch
        ids = torch.randint(0, self.vocab, (B, P), device="cuda")
        mask = torch.ones_like(ids)

        def gen(n):
            with torch.no_grad():
                self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, use_cache=True, pad_token_id=0)
        return (self._timed(lambda: gen(N), iters) - self._timed(lambda: gen(1), iters)) / (N - 1)

    def prefill_seconds(self, P, iters):
        torch = self.torch
        ids = torch.randint(0, self.vocab, (1, P), device="cuda")

        def fwd():
            with torch.no_grad():
                self.model(ids, use_cache=True, logits_to_keep=1)
        return self._timed(fwd, iters)

    def close(self):
        del self.model
        self.torch.cuda.empty_cache()


def try_fla(cfg, enabled):
    if not enabled:
        return None, "off"
    try:
        return FLA(cfg), None
    except Exception as e:  # torch / fla missing, no GPU, or an unsupported config
        return None, f"{type(e).__name__}: {str(e)[:80]}"


def fla_seconds(fla, method, *args):
    """FLA's time, or None (printed) when FLA is off or fails at this shape."""
    if fla is None:
        return None
    try:
        return getattr(fla, method)(*args)
    except Exception as e:  # e.g. out of memory at a large batch
        print(f"   FLA {method}{args} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None


def main(argv=None):
    args = parse_args(argv)
    from gdn_jax.xla_flags import single_threaded_eigen_on_cpu

    single_threaded_eigen_on_cpu()
    import jax
    from flax import nnx

    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
    from configs.model import get_model_config
    from gdn_jax.inference import for_inference
    from gdn_jax.model import LM, count_params, flops_per_token
    from gdn_jax.train.metrics import peak_flops

    dev = jax.devices()[0]
    bw = args.bandwidth or measure_bandwidth(args.smoke)
    peak = peak_flops(dev)
    print(f"{dev.device_kind} | jax {jax.__version__} | bandwidth {bw / 1e12:.3f} TB/s "
          f"({'given' if args.bandwidth else 'measured, x + 1 copy'}) | peak "
          f"{'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} | prompt {args.prompt}, "
          f"new {args.new}, iters {args.iters}", flush=True)
    decode_rows, prefill_rows = [], []
    for name in args.configs:
        overrides = {} if args.gdn_impl is None else dict(gdn_impl=args.gdn_impl)
        cfg = get_model_config(name, **overrides)
        raw = LM(cfg, rngs=nnx.Rngs(0))
        bases = {split_variant(v)[0] for v in args.variants}
        models = {"fused": for_inference(raw, dtype=args.dtype)}  # the default copy: fused
        models["stream"] = models["fused"]
        # the unfused copy always: the floor's bytes and the prefill rows are taken from it
        models["loop"] = for_inference(raw, dtype=args.dtype, fuse=False)
        if "pdec" in bases:
            models["pdec"] = for_inference(raw, dtype=args.dtype, decode_impl="pallas")
        if "python" in bases:
            models["python"] = raw
        del raw
        print(f"== {name}: {count_params(cfg) / 1e6:,.1f}M params, gdn_impl {cfg.gdn_impl}", flush=True)
        fla, fla_note = try_fla(cfg, args.fla)
        if fla_note and args.fla:
            print(f"   FLA not timed: {fla_note}", flush=True)
        for B in args.batches:
            tokens = jax.random.randint(jax.random.key(B), (B, args.prompt), 0, cfg.vocab_size)
            fla_s = fla_seconds(fla, "decode", B, args.prompt, args.new, args.iters)
            floor_ms = 1e3 * floor_bytes(models["loop"], tokens, args.new) / bw
            for v in args.variants:
                prof = None if not args.profile else os.path.join(args.profile, f"{name}_{v}_B{B}")
                s, gen = Ours(models[split_variant(v)[0]], v).decode(tokens, args.new, args.iters,
                                                                     prof)
                row = dict(config=name, variant=v, B=B, ms=1e3 * s, tok_s=B / s,
                           gen_ms=None if gen is None else 1e3 * gen, floor_ms=floor_ms,
                           fla_ms=None if fla_s is None else 1e3 * fla_s)
                decode_rows.append(row)
                print("   " + format_decode(row), flush=True)
        for P in args.prefill:
            tokens = jax.random.randint(jax.random.key(P), (1, P), 0, cfg.vocab_size)
            s = Ours(models["loop"], "loop").prefill_seconds(tokens, args.iters)
            fla_s = fla_seconds(fla, "prefill_seconds", P, args.iters)
            row = dict(config=name, P=P, ms=1e3 * s, tok_s=P / s,
                       floor_ms=None if peak is None else 1e3 * P * flops_per_token(cfg, P) / 3 / peak,
                       fla_tok_s=None if fla_s is None else P / fla_s)
            prefill_rows.append(row)
            print("   " + format_prefill(row), flush=True)
        if fla:
            fla.close()
        del models
    print("\n" + table(decode_rows, prefill_rows))


def _f(x, fmt):
    return "n/a" if x is None else format(x, fmt)


def format_decode(r):
    ratio = None if r["fla_ms"] is None else r["fla_ms"] / r["ms"]
    return (f"decode {r['config']} {r['variant']} B={r['B']}: {r['ms']:.3f} ms/token, "
            f"{r['tok_s']:,.0f} tokens/s, generate() {_f(r['gen_ms'], '.3f')} ms/token, floor "
            f"{r['floor_ms']:.3f} ms ({r['ms'] / r['floor_ms']:.1f}x), FLA {_f(r['fla_ms'], '.3f')} "
            f"ms/token (FLA/ours {_f(ratio, '.2f')})")


def format_prefill(r):
    return (f"prefill {r['config']} P={r['P']}: {r['ms']:.1f} ms, {r['tok_s']:,.0f} tokens/s, "
            f"compute floor {_f(r['floor_ms'], '.1f')} ms, FLA {_f(r['fla_tok_s'], ',.0f')} tokens/s")


def table(decode_rows, prefill_rows):
    lines = ["| config | variant | B | ms/token | tokens/s | generate() ms/token | floor ms | x floor "
             "| FLA ms/token | FLA/ours |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in decode_rows:
        ratio = None if r["fla_ms"] is None else r["fla_ms"] / r["ms"]
        lines.append(f"| {r['config']} | {r['variant']} | {r['B']} | {r['ms']:.3f} | "
                     f"{r['tok_s']:,.0f} | {_f(r['gen_ms'], '.3f')} | {r['floor_ms']:.3f} | "
                     f"{r['ms'] / r['floor_ms']:.1f} | {_f(r['fla_ms'], '.3f')} | {_f(ratio, '.2f')} |")
    lines += ["", "| config | prefill P | ms | tokens/s | compute floor ms | FLA tokens/s | ours/FLA |",
              "|---|---|---|---|---|---|---|"]
    for r in prefill_rows:
        ratio = None if r["fla_tok_s"] is None else r["tok_s"] / r["fla_tok_s"]
        lines.append(f"| {r['config']} | {r['P']} | {r['ms']:.1f} | {r['tok_s']:,.0f} | "
                     f"{_f(r['floor_ms'], '.1f')} | {_f(r['fla_tok_s'], ',.0f')} | {_f(ratio, '.2f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
