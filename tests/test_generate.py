"""Decoding: prefill + cached steps reproduce the parallel forward; batching by left padding is exact."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs.model import get_model_config
from gdn_jax.generate import decode_step, generate, left_pad_segment_ids, sample_logits
from gdn_jax.model import LM


def tiny(name, **kw):
    return LM(get_model_config(name, dtype="float32", gdn_impl="chunk", **kw), rngs=nnx.Rngs(0))


def teacher_forced_logits(model, tokens, P):
    """Logits at positions P-1 .. T-1 from prefill(tokens[:, :P]) then one cached step per token."""
    graphdef, state = nnx.split(model)
    T = tokens.shape[1]
    prefill = nnx.jit(lambda m, t: m.prefill(t, cache_len=T))
    logits, cache = prefill(model, tokens[:, :P])
    out = [logits[:, -1]]
    for t in range(P, T):
        _, step_logits, cache = decode_step(graphdef, state, cache, tokens[:, t], jax.random.key(0),
                                            temperature=0.0, top_k=None, top_p=None)
        out.append(step_logits)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("name,P", [
    ("tiny", 9), ("tiny_h1", 21), ("tiny_h2", 13), ("tiny_deltanet", 7),
    ("tiny_mamba2", 18), ("tiny_transformer", 6), ("tiny_swa", 3), ("tiny_swa", 20)])
def test_cached_decode_matches_full_forward(name, P):
    """tiny_swa / tiny_h1 have a 16-token window; T = 40 decodes well past it, from short and
    from longer-than-window prompts."""
    model = tiny(name)
    T = 40
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, 256)
    full = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
    np.testing.assert_allclose(teacher_forced_logits(model, tokens, P), full[:, P - 1:],
                               rtol=2e-4, atol=2e-4)


def naive_greedy(model, prompt, n):
    """Greedy decoding by re-running the whole forward each token (no cache). The sequence is
    right-padded to a fixed length so one compile serves every step (causality keeps pads out)."""
    fwd = nnx.jit(lambda m, t: m(t))
    P = prompt.shape[1]
    seq = jnp.pad(prompt, ((0, 0), (0, n)))
    for i in range(n):
        nxt = jnp.argmax(fwd(model, seq)[:, P + i - 1], axis=-1).astype(jnp.int32)
        seq = seq.at[:, P + i].set(nxt)
    return np.asarray(seq[:, P:])


def test_greedy_generate_matches_uncached_greedy():
    model = tiny("tiny_h1")
    prompt = jax.random.randint(jax.random.key(2), (2, 7), 0, 256)
    got = generate(model, prompt, max_new_tokens=6, temperature=0.0, rng=jax.random.key(0))
    np.testing.assert_array_equal(got, naive_greedy(model, prompt, 6))


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny("tiny_h2")
    lengths = [7, 3]
    P = max(lengths)
    prompts = [jax.random.randint(jax.random.key(10 + i), (1, n), 0, 256) for i, n in enumerate(lengths)]
    batch = jnp.concatenate([jnp.pad(p, ((0, 0), (P - p.shape[1], 0)), constant_values=99)
                             for p in prompts])
    got = generate(model, batch, max_new_tokens=5, temperature=0.0, rng=jax.random.key(0),
                   prompt_lengths=jnp.array(lengths))
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(got[i], naive_greedy(model, p, 5)[0])


def test_left_pad_segment_ids():
    np.testing.assert_array_equal(left_pad_segment_ids(jnp.array([2, 4]), 4),
                                  [[0, 0, 1, 1], [1, 1, 1, 1]])


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.3, 0.15]] * 2000))
    keys = jax.random.key(3)
    greedy = sample_logits(logits, keys, temperature=0.0)
    assert (np.asarray(greedy) == 1).all()
    assert (np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=1)) == 1).all()
    top2 = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=2))
    assert set(np.unique(top2)) == {1, 2}
    assert abs((top2 == 1).mean() - 0.5 / 0.8) < 0.05  # renormalised over the top 2
    # top_p = 0.7: tokens 1 (0.5) and 2 (mass before = 0.5 < 0.7) stay; 3 (mass before 0.8) goes.
    topp = np.asarray(sample_logits(logits, keys, temperature=1.0, top_p=0.7))
    assert set(np.unique(topp)) == {1, 2}
    full = np.asarray(sample_logits(logits, keys, temperature=1.0))
    np.testing.assert_allclose(np.bincount(full, minlength=4) / 2000, [0.05, 0.5, 0.3, 0.15], atol=0.04)


def test_eos_stops_row():
    model = tiny("tiny")
    prompt = jax.random.randint(jax.random.key(4), (2, 5), 0, 256)
    free = generate(model, prompt, max_new_tokens=6, temperature=0.0, rng=jax.random.key(0))
    eos = int(free[0, 2])
    got = np.asarray(generate(model, prompt, max_new_tokens=6, temperature=0.0,
                              rng=jax.random.key(0), eos_id=eos))
    first = int(np.argmax(np.asarray(free[0]) == eos))
    np.testing.assert_array_equal(got[0, :first + 1], free[0, :first + 1])
    assert (got[0, first:] == eos).all()
