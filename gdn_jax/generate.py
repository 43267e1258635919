"""Sampling from an LM: parallel prefill over the prompt, then one jitted decode step per token.

Prompts of different lengths share a batch by LEFT padding: row b holds its prompt in the last
prompt_lengths[b] columns of prompt_tokens_BxP. The pad columns get segment id 0 and the prompt
segment id 1, so the pads are a separate packed document: recurrent states restart at the first real
token, short convs and attention never read the pads, and RoPE positions start at 0 on the first
real token. Every row then decodes in lockstep from column P on.

The decode cache (see gdn_jax.model) holds, per layer: the q/k/v conv windows and the [B, HV, K, V]
state for GDN / DeltaNet, the conv window and [B, H, P, N] SSM state for Mamba2, a rolling window
of keys/values for SWA, and every key/value for full attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Next token ids [B] int32: argmax when temperature == 0, else top-k / top-p sampling."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest set of top tokens whose mass reaches top_p (always the first one).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1,
                         keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(graphdef, state, tokens_BxP, segment_ids, *, cache_len):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(tokens_BxP, segment_ids, cache_len=cache_len)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def decode_step(graphdef, state, cache, tokens_B, rng, *, temperature, top_k, top_p):
    """The whole-model decode step: feeds tokens_B, returns (next tokens [B], logits [B, V], cache)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.step(tokens_B, cache)
    return sample_logits(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p), logits, cache


def left_pad_segment_ids(prompt_lengths_B: jax.Array, P: int) -> jax.Array:
    """[B, P] int32: 0 on the left pads, 1 on the last prompt_lengths[b] columns."""
    return (jnp.arange(P)[None, :] >= P - jnp.asarray(prompt_lengths_B)[:, None]).astype(jnp.int32)


def generate(model, prompt_tokens_BxP: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             rng: jax.Array, prompt_lengths: jax.Array | None = None,
             eos_id: int | None = None) -> jax.Array:
    """Samples max_new_tokens tokens after each prompt.

    Args:
      model: a gdn_jax.model.LM.
      prompt_tokens_BxP: int32 prompts, left-padded when prompt_lengths is given.
      max_new_tokens: tokens to generate per row.
      temperature: 0 for greedy decoding; otherwise logits are divided by it before sampling.
      top_k, top_p: optional truncation of the sampling distribution.
      rng: a jax PRNG key.
      prompt_lengths: [B] real prompt lengths (>= 1); None means every row is a full prompt.
      eos_id: once a row emits it, the row keeps emitting it.
    Returns:
      [B, max_new_tokens] int32 generated tokens (the prompt is not repeated).
    """
    B, P = prompt_tokens_BxP.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(prompt_tokens_BxP, jnp.int32)
    segment_ids = None if prompt_lengths is None else left_pad_segment_ids(prompt_lengths, P)
    last_logits, cache = _prefill(graphdef, state, tokens, segment_ids,
                                  cache_len=P + max_new_tokens)
    rng, key = jax.random.split(rng)
    tok = sample_logits(last_logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
    done = jnp.zeros((B,), bool)
    out = []
    for i in range(max_new_tokens):
        if eos_id is not None:
            tok = jnp.where(done, eos_id, tok)
            done = done | (tok == eos_id)
        out.append(tok)
        if i + 1 == max_new_tokens:
            break
        rng, key = jax.random.split(rng)
        tok, _, cache = decode_step(graphdef, state, cache, tok, key, temperature=temperature,
                                    top_k=top_k, top_p=top_p)
    return jnp.stack(out, axis=1)
