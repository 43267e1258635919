"""Decoding: prefill + cached steps reproduce the parallel forward; left-pad segment ids; sampling.

generate()'s loop, left-padded batches and EOS are tested in test_generate_loop.py."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs.model import get_model_config
from gdn_jax.generate import decode_step, left_pad_segment_ids, sample_logits
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
