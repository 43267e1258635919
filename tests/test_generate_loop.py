"""generate()'s on-device token loop and the inference copy it runs on.

The loop gives the tokens of stepping from Python and of the argmax of full-forward logits, with
mixed prompt lengths; rows stop at EOS alone; the stream sees every token; bf16 inference copies
keep float32 states and agree with float32; the default copy computes bit for bit what the training
model does; decode_recurrence matches the float64 oracle; bad arguments fail before any compile.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.model import get_model_config
from gdn_jax import generate as G
from gdn_jax.inference import for_inference, is_inference_copy
from gdn_jax.ops import decode_recurrence
from gdn_jax.reference import recurrent_step, repeat_heads
from gdn_jax.model import LM
from gdn_jax.ops import gated_delta_rule_step
from jaxpr_eqns import all_eqns
from op_inputs import random_op_inputs
from oracle import gated_delta_rule_oracle

LENGTHS = (21, 9, 1)  # one batch, left-padded; 21 spans two 16-token chunks and the 16-token window
N = 6


@functools.lru_cache(maxsize=None)
def lm(name, dtype="float32", gdn_impl="chunk", init_std=0.3):
    """A random tiny LM (never mutated: the tests use copies). init_std 0.3: at 0.02 a random tiny
    LM repeats one token, so agreement between decoders would say little."""
    cfg = get_model_config(name, dtype=dtype, gdn_impl=gdn_impl, init_std=init_std)
    return LM(cfg, rngs=nnx.Rngs(0))


def left_padded_batch(lengths=LENGTHS, seed=1):
    P = max(lengths)
    rows = [np.asarray(jax.random.randint(jax.random.key(seed + i), (n,), 0, 256))
            for i, n in enumerate(lengths)]
    return rows, np.stack([np.pad(r, (P - len(r), 0), constant_values=7) for r in rows])


def step_by_step(model, batch, lengths, n):
    """Greedy decoding from Python: the same prefill, then one jitted decode_step per token."""
    P = batch.shape[1]
    segs = G.left_pad_segment_ids(jnp.asarray(lengths), P)
    graphdef, state = nnx.split(model)
    tok, cache, _ = G.prefill(graphdef, state, batch, segs, jax.random.key(0), cache_len=P + n,
                              temperature=0.0, top_k=None, top_p=None)
    out = [tok]
    for _ in range(n - 1):
        tok, _, cache = G.decode_step(graphdef, state, cache, tok, jax.random.key(0),
                                      temperature=0.0, top_k=None, top_p=None)
        out.append(tok)
    return np.stack(out, axis=1)


def full_forward_argmax(model, rows, new):
    """argmax of the full forward's logits at each row's last prompt position and at its new tokens
    but the last: right-padded to one length (causality keeps the pads out of earlier logits)."""
    T = max(len(r) for r in rows) + new.shape[1]
    seqs = np.stack([np.pad(np.concatenate([r, g]), (0, T - len(r) - len(g)))
                     for r, g in zip(rows, new)])
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(seqs)))
    return np.stack([logits[b, len(r) - 1:len(r) - 1 + new.shape[1]].argmax(-1)
                     for b, r in enumerate(rows)])


@pytest.mark.parametrize("name,fuse", [("tiny", False), ("tiny_h1", True), ("tiny_h2", False)])
def test_loop_matches_step_by_step_and_full_forward(name, fuse):
    model = lm(name)
    infer = for_inference(model, fuse=fuse)
    rows, batch = left_padded_batch()
    got = np.asarray(G.generate(infer, batch, max_new_tokens=N, temperature=0.0,
                                prompt_lengths=np.array(LENGTHS), check_every=1 + 2 * fuse))
    assert len(np.unique(got)) > N  # the test means something only if tokens vary
    np.testing.assert_array_equal(got, step_by_step(infer, jnp.asarray(batch), LENGTHS, N))
    np.testing.assert_array_equal(got, full_forward_argmax(model, rows, got))


def test_sampling_in_the_loop_draws_what_stepping_from_python_draws():
    """Temperature / top-k / top-p: the loop splits the key as generate() always has (once for the
    first token, once per step), so a seed gives the samples it gave before the loop."""
    model = for_inference(lm("tiny"))
    _, batch = left_padded_batch((8, 8), seed=9)
    opts = dict(temperature=0.8, top_k=20, top_p=0.9)
    got = np.asarray(G.generate(model, batch, max_new_tokens=N, rng=jax.random.key(4), **opts))
    graphdef, state = nnx.split(model)
    logits, cache = nnx.jit(lambda m, t: m.prefill(t, cache_len=8 + N))(model, jnp.asarray(batch))
    rng, key = jax.random.split(jax.random.key(4))
    tok = G.sample_logits(logits[:, -1], key, **opts)
    want = [tok]
    for _ in range(N - 1):
        rng, key = jax.random.split(rng)
        tok, _, cache = G.decode_step(graphdef, state, cache, tok, key, **opts)
        want.append(tok)
    np.testing.assert_array_equal(got, np.stack(want, axis=1))
    assert len(np.unique(got)) > 2


def test_pallas_prefill_hands_its_state_to_the_loop():
    """Left-padded prompts through the Pallas kernels (interpret mode here) decode like chunk."""
    rows, batch = left_padded_batch()
    outs = [G.generate(lm("tiny", gdn_impl=impl), batch, max_new_tokens=N, temperature=0.0,
                       prompt_lengths=np.array(LENGTHS)) for impl in ("chunk", "pallas")]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_rows_stop_at_eos_the_others_continue_and_the_stream_sees_every_token():
    model = for_inference(lm("tiny"))
    _, batch = left_padded_batch((8, 8, 8), seed=5)
    n = 10
    free = np.asarray(G.generate(model, batch, max_new_tokens=n, temperature=0.0))
    eos = next(int(t) for t in free[0, 1:] if t not in free[1])  # row 1 never emits it
    seen = []
    got = np.asarray(G.generate(model, batch, max_new_tokens=n, temperature=0.0, eos_id=eos,
                                callback=lambda i, t: seen.append((i, t))))
    for r in range(3):
        stop = int(np.argmax(free[r] == eos)) if eos in free[r] else n
        np.testing.assert_array_equal(got[r, :stop], free[r, :stop])
        assert (got[r, stop:] == eos).all()
    stop = int(np.argmax(got[0] == eos))
    assert eos not in got[1] and 0 < stop < n - 1
    assert [i for i, _ in seen] == list(range(n))
    np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), got)
    # Every row as row 0: all are done at `stop`, and the loop runs no step after that.
    seen.clear()
    same = np.repeat(batch[:1], 3, axis=0)
    got = np.asarray(G.generate(model, same, max_new_tokens=n, temperature=0.0, eos_id=eos,
                                callback=lambda i, t: seen.append((i, t))))
    assert [i for i, _ in seen] == list(range(stop + 1))
    want = np.where(np.arange(n) < stop, free[:1], eos).repeat(3, 0)
    np.testing.assert_array_equal(got, want)
    # Testing the stop condition every 4 steps: the same tokens; the stream may see up to 3 more
    # steps, all EOS.
    seen.clear()
    got = np.asarray(G.generate(model, same, max_new_tokens=n, temperature=0.0, eos_id=eos,
                                callback=lambda i, t: seen.append((i, t)), check_every=4))
    np.testing.assert_array_equal(got, want)
    assert stop + 1 <= len(seen) <= min(n, stop + 4) and [i for i, _ in seen] == list(range(len(seen)))
    assert all((t == eos).all() for _, t in seen[stop:])


def test_token_budgets_up_to_64_share_one_prefill_and_one_loop_compile():
    """eval's needle tasks ask for different answer lengths at one prompt length: with an attention
    layer (whose cache slots depend on the budget) the calls compile prefill and the loop once, and
    the shorter budget gives the first tokens of the longer."""
    model = for_inference(lm("tiny_h1"))
    _, batch = left_padded_batch((13, 13), seed=11)
    before = G.prefill._cache_size(), G.decode_loop._cache_size()
    outs = [np.asarray(G.generate(model, batch, max_new_tokens=n, temperature=0.0)) for n in (3, 40, 64)]
    assert (G.prefill._cache_size() - before[0], G.decode_loop._cache_size() - before[1]) == (1, 1)
    np.testing.assert_array_equal(outs[0], outs[2][:, :3])
    np.testing.assert_array_equal(outs[1], outs[2][:, :40])
    np.asarray(G.generate(model, batch, max_new_tokens=65, temperature=0.0))  # a wider loop
    assert G.decode_loop._cache_size() - before[1] == 2


def test_bf16_inference_copy_keeps_float32_states_and_agrees_with_float32():
    model = lm("tiny_h2", init_std=0.02)  # float32 weights and compute; the preset's init
    bf16 = for_inference(model, dtype="bfloat16")
    kernels = [m.kernel[...] for _, m in nnx.iter_modules(bf16) if isinstance(m, nnx.Linear)]
    assert kernels and all(k.dtype == jnp.bfloat16 for k in kernels)
    assert bf16.embedding[...].dtype == jnp.float32 and bf16.tied_head[...].dtype == jnp.bfloat16
    assert is_inference_copy(bf16) and not is_inference_copy(lm("tiny_h2", dtype="bfloat16"))
    tokens = jax.random.randint(jax.random.key(3), (2, 24), 0, 256)
    prefill = nnx.jit(lambda m, t: m.prefill(t, cache_len=24))
    step = nnx.jit(lambda m, x, c: m.step(x, c))
    logits = {}
    for key, m in (("f32", model), ("bf16", bf16)):
        out, cache = prefill(m, tokens[:, :16])
        steps = [out[:, -1]]
        for t in range(16, 23):
            step_logits, cache = step(m, tokens[:, t], cache)
            steps.append(step_logits)
        logits[key] = np.stack(steps, axis=1)
        states = [c["state"] for c in cache["layers"] if "state" in c]
        assert len(states) == 2 and all(s.dtype == jnp.float32 for s in states)  # Mamba2 and GDN
    scale = np.abs(logits["f32"]).max()
    err = np.abs(logits["bf16"] - logits["f32"]).max()
    assert err < 0.02 * scale, (err, scale)  # bf16 has 8 bits of mantissa: ~0.4% per rounding
    assert err > 1e-4 * scale  # and the copy really computed in bf16


def test_default_inference_copy_is_bit_identical_to_the_training_model():
    """A bf16 model's copy holds the values its matmuls cast to anyway: same logits, same tokens as
    the pre-loop generate() (the training model stepped from Python), so eval results hold."""
    model = lm("tiny_h1", dtype="bfloat16")
    _, batch = left_padded_batch()
    got = G.generate(for_inference(model), batch, max_new_tokens=N, temperature=0.0,
                     prompt_lengths=np.array(LENGTHS))
    np.testing.assert_array_equal(got, step_by_step(model, jnp.asarray(batch), LENGTHS, N))
    caches = [G.prefill(*nnx.split(m), jnp.asarray(batch), G.left_pad_segment_ids(LENGTHS, 21),
                        jax.random.key(0), cache_len=21 + N, temperature=0.0, top_k=None,
                        top_p=None)[1] for m in (model, for_inference(model))]
    for a, b in zip(jax.tree.leaves(caches[0]), jax.tree.leaves(caches[1])):
        np.testing.assert_array_equal(a, b)


def test_inference_dtype_is_taken_by_name_or_as_a_jax_dtype_and_a_bad_one_is_named():
    model = lm("tiny")
    by_name, by_type = for_inference(model, dtype="bfloat16"), for_inference(model, dtype=jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(nnx.state(by_name)), jax.tree.leaves(nnx.state(by_type))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert by_type.lm_head is None or by_type.lm_head[...].dtype == jnp.bfloat16
    for bad in ("int8", "bfloat", object()):
        with pytest.raises(ValueError, match="dtype"):
            for_inference(model, dtype=bad)


def test_loop_casts_no_weight_and_consumes_the_cache():
    """No float32 -> compute-dtype cast of a weight inside the loop (the training model has them,
    so the check can fail), and the donated cache is consumed rather than copied."""
    casts = {}
    _, batch = left_padded_batch()
    segs = G.left_pad_segment_ids(LENGTHS, 21)
    for key, model in (("train", lm("tiny_h1", dtype="bfloat16")),
                       ("infer", for_inference(lm("tiny_h1", dtype="bfloat16")))):
        graphdef, state = nnx.split(model)
        weight_shapes = {m.kernel[...].shape for _, m in nnx.iter_modules(model)
                         if isinstance(m, nnx.Linear)}
        first, cache, rng = G.prefill(graphdef, state, jnp.asarray(batch), segs, jax.random.key(0),
                                      cache_len=21 + N, temperature=0.0, top_k=None, top_p=None)
        loop = functools.partial(G.decode_loop, graphdef, capacity=G.loop_capacity(N),
                                 temperature=0.0, top_k=None, top_p=None, eos_id=None, stream=False,
                                 check_every=1)
        args = (state, cache, first, rng, jnp.int32(0), jnp.int32(N))
        casts[key] = [e for e in all_eqns(jax.make_jaxpr(loop)(*args).jaxpr)
                      if e.primitive.name == "convert_element_type"
                      and e.invars[0].aval.shape in weight_shapes
                      and e.invars[0].aval.dtype == jnp.float32]
    loop(*args)
    assert all(x.is_deleted() for x in jax.tree.leaves(cache))
    assert casts["train"] and not casts["infer"]


def test_decode_recurrence_matches_the_oracle_and_the_op_step():
    x = random_op_inputs(0, B=2, T=1, H=2, HV=4, K=8, V=6, with_state=True)
    o_ref, S_ref = gated_delta_rule_oracle(**x)
    args = [jnp.asarray(x[n][:, 0]) for n in ("q", "k", "v", "g", "beta")]
    S0 = jnp.asarray(x["initial_state"])
    o, S = decode_recurrence(*args, S0)
    np.testing.assert_allclose(o, o_ref[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(S, S_ref, rtol=1e-5, atol=1e-5)
    o_op, S_op = gated_delta_rule_step(*args, S0)
    np.testing.assert_allclose(o_op, o, rtol=0, atol=0)  # the op's step is this arithmetic
    # The scan reference's step (S' formed, then read again for o).
    q, k, v, g, beta = args
    o_ref2, S_ref2 = recurrent_step(S0, repeat_heads(q, 4) * 8 ** -0.5, repeat_heads(k, 4), v, g,
                                    beta)
    np.testing.assert_allclose(o, o_ref2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(S, S_ref2, rtol=1e-5, atol=1e-5)


BAD = [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=257), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(prompt_lengths=np.array([0, 4])), "prompt_lengths"),
    (dict(prompt_lengths=np.array([5, 4])), "prompt_lengths"),
    (dict(prompt_lengths=np.array([4, 4, 4])), "prompt_lengths"),
    (dict(prompt_lengths=np.array([[4, 4]])), "prompt_lengths"),
    (dict(cache_len=4 + 3 - 1), "cache_len"),
    (dict(eos_id=256), "eos_id"),
    (dict(prompt=np.full((2, 4), 256)), "prompt_tokens"),
    (dict(prompt=np.ones((4,), np.int32)), "prompt_tokens"),
    (dict(temperature=0.8, rng=None), "rng"),
    (dict(check_every=0), "check_every"),
]


@pytest.mark.parametrize("bad,name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_arguments_raise_before_anything_compiles(bad, name, monkeypatch):
    def compiled(*a, **k):
        raise AssertionError("compiled before validating")
    monkeypatch.setattr(G, "prefill", compiled)
    monkeypatch.setattr(G, "decode_loop", compiled)
    kw = dict(prompt=np.ones((2, 4), np.int32), max_new_tokens=3, temperature=1.0,
              rng=jax.random.key(0))
    kw.update(bad)
    with pytest.raises(ValueError, match=name):
        G.generate(lm("tiny"), kw.pop("prompt"), **kw)


def _bench():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    import generate_throughput
    return generate_throughput


def test_bench_memory_floor_counts_the_bytes_of_a_step():
    """tiny (2 GDN layers, d 64, 2 heads K 32 V 64, MLP 128, tied vocab 256), B = 2, by hand:
    bf16 projection kernels 2 x (2 x 64x64 + 3 x 64x128 + 2 x 64x2 + 128x64 + 2 x 64x128 + 128x64)
    = 2 x 57,600 x 2 B; float32 small params (2 x 1,220 + final norm 64) x 4 B; the bf16 tied head
    256 x 64 x 2 B; two float32 embedding rows 2 x 64 x 4 B; and, read and written, per layer the
    bf16 conv windows 2 x 3 x (64 + 64 + 128) x 2 B and the float32 state 2 x 2 x 32 x 64 x 4 B,
    plus pos [2] and t (int32)."""
    model = for_inference(lm("tiny", dtype="bfloat16", init_std=0.02))
    weights = 2 * 57_600 * 2 + (2 * 1_220 + 64) * 4 + 256 * 64 * 2 + 2 * 64 * 4
    cache = 2 * (2 * 3 * 256 * 2 + 2 * 2 * 32 * 64 * 4) + 2 * 4 + 4
    assert _bench().floor_bytes(model, jnp.zeros((2, 8), jnp.int32), 4) == weights + 2 * cache


def test_bench_smoke_run_prints_its_tables(capsys):
    """Variants without "loop" (whose unfused copy the floor and the prefill rows read: --variants
    fused alone once failed on the GPU) and the Pallas decode step's variant."""
    _bench().main(["--smoke", "--configs", "tiny", "--batches", "1", "--variants", "fused,pdec",
                   "--prefill", "32", "--no-fla"])
    out = capsys.readouterr().out
    for variant in ("fused", "pdec"):
        row = next(line for line in out.splitlines() if line.startswith(f"| tiny | {variant} | 1 |"))
        ms, tok_s, gen_ms, floor_ms = (float(x.replace(",", "")) for x in row.split("|")[4:8])
        assert 0 < ms < 1e3 and abs(tok_s - 1e3 / ms) < 0.01 * tok_s and gen_ms > 0 and floor_ms > 0
    assert "| tiny | 32 |" in out


def test_bench_arguments_name_what_is_wrong(capsys):
    """An empty --prefill means no prefill rows; a zero or negative length is refused by name (a
    prefill of 0 tokens used to reach the op and fail there, after the decode rows' minutes)."""
    bench = _bench()
    assert bench.parse_args(["--prefill", "", "--no-fla"]).prefill == []
    for flag in ("--prefill", "--batches"):
        with pytest.raises(SystemExit):
            bench.parse_args([flag, "0"])
        assert f"{flag} must be positive" in capsys.readouterr().err


def test_niah_bench_before_path_decodes_like_generate():
    """bench/niah_walltime.py's "before" path (Python loop of decode_step on the float32 model) must
    produce the tokens generate() does on the same float32 model, else its wall time compares
    different work; and it keeps emitting EOS once a row has."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    import niah_walltime

    model = lm("tiny", init_std=0.5)
    prompt = np.asarray(jax.random.randint(jax.random.key(3), (3, 12), 0, model.cfg.vocab_size))
    fast = np.asarray(G.generate(model, prompt, max_new_tokens=9, temperature=0.0))
    slow = niah_walltime.python_loop_generate_fn(model)(prompt, 9)
    np.testing.assert_array_equal(slow, fast)
    eos = int(fast[0, 2])
    with_eos = niah_walltime.python_loop_generate_fn(model)(prompt, 9, eos_id=eos)
    np.testing.assert_array_equal(with_eos,
                                  np.asarray(G.generate(model, prompt, max_new_tokens=9, temperature=0.0,
                                                        eos_id=eos)))
    assert (with_eos[0, 2:] == eos).all()
