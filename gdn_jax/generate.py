"""Sampling from an LM: one compiled prefill over the prompts, then the whole token loop on the device.

    new_BxN = generate(model, prompts_BxP, max_new_tokens=N, temperature=0.0, eos_id=2)

generate() runs two compiled functions, each compiled once per shape and sampling options (the
loop for a power-of-two token budget, so one compile serves every max_new_tokens up to it):
  prefill      the parallel forward over the prompts (GDN through gated_delta_rule's chunk or
               Pallas path, so a long prompt is never stepped token by token), the logits of the
               last position only, and the first sampled token; returns the decode cache.
  decode_loop  a lax.while_loop that feeds the last token through LM.step, samples the next, and
               writes it into the output, until N tokens are out or every row has emitted
               eos_id. The cache is donated and carried by the loop, so XLA updates recurrent
               states and KV slots in place.
The model is used through its inference copy (gdn_jax/inference.py: weights cast once to the compute
dtype); generate() makes one when handed a training model. Make it once at load to save that pass.

Prompts of different lengths share a batch by LEFT padding: row b holds its prompt in the last
prompt_lengths[b] columns of prompt_tokens_BxP. The pad columns get segment id 0 and the prompt
segment id 1, so the pads are a separate packed document: recurrent states restart at the first real
token, short convs and attention never read the pads, and RoPE positions start at 0 on the first
real token. Every row then decodes in lockstep from column P on; a row that has emitted eos_id keeps
emitting it.

Streaming: `callback(i, tokens_B)` is called on the host with the i-th new token of every row (numpy
int32 [B]), in order, through jax.experimental.io_callback(ordered=True). Each call copies B int32
to the host and makes the device wait for the host round trip, every token; the `stream` variant
of bench/generate_throughput.py measures that cost.

The decode cache (see gdn_jax.model) holds, per layer: the q/k/v conv windows and the [B, HV, K, V]
state for GDN / DeltaNet, the conv window and [B, H, P, N] SSM state for Mamba2, a rolling window
of keys/values for SWA, and every key/value for full attention.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import operator
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from gdn_jax.inference import for_inference, is_inference_copy

Callback = Callable[[int, np.ndarray], None]


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


def left_pad_segment_ids(prompt_lengths_B: jax.Array, P: int) -> jax.Array:
    """[B, P] int32: 0 on the left pads, 1 on the last prompt_lengths[b] columns."""
    return (jnp.arange(P)[None, :] >= P - jnp.asarray(prompt_lengths_B)[:, None]).astype(jnp.int32)


# ------------------------------------------------------------------------------ compiled pieces


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "temperature", "top_k",
                                             "top_p"))
def prefill(graphdef, state, tokens_BxP, segment_ids_BxP, rng, *, cache_len, temperature, top_k,
            top_p):
    """Parallel forward over the prompts. Returns (first new token [B] int32, cache, rng)."""
    model = nnx.merge(graphdef, state)
    logits_Bx1xV, cache = model.prefill(tokens_BxP, segment_ids_BxP, cache_len=cache_len,
                                        last_only=True)
    rng, key = _split(rng, temperature)
    first_B = sample_logits(logits_Bx1xV[:, 0], key, temperature=temperature, top_k=top_k,
                            top_p=top_p)
    return first_B, cache, rng


def _split(rng, temperature):
    """(carried key, key for this token); greedy decoding draws nothing, so it splits nothing."""
    return jax.random.split(rng) if temperature > 0 else (rng, rng)


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "temperature", "top_k",
                                             "top_p", "eos_id", "stream", "check_every"),
                   donate_argnames=("cache",))
def decode_loop(graphdef, state, cache, first_B, rng, stream_id, num_tokens, *, capacity,
                temperature, top_k, top_p, eos_id, stream, check_every=1):
    """The token loop: out[:, 0] = first_B; out[:, i] = sample(LM.step(out[:, i-1])) for
    i < N = num_tokens (an int32 scalar <= capacity, so one compile serves every N up to it),
    stopping early once every row has emitted eos_id (the rest of the output is eos_id).

    check_every = k runs k steps between tests of the stop condition (an inner loop of static
    trip count): a while loop whose condition depends on data makes the host read it back after
    every iteration on a GPU, so k > 1 trades up to k - 1 wasted steps at the end for k times
    fewer of those read-backs. Steps past N change nothing that is returned but the cache.
    Returns (out [B, capacity + check_every - 1] int32, of which the first N columns are the
    tokens; the final cache; the number of steps run plus one)."""
    model = nnx.merge(graphdef, state)
    B, N = first_B.shape[0], num_tokens

    def emit(i, tok_B):
        if stream:
            io_callback(_emit, None, stream_id, i, N, tok_B, ordered=True)

    fill = 0 if eos_id is None else eos_id
    out_BxC = jnp.full((B, capacity + check_every - 1), fill, jnp.int32).at[:, 0].set(first_B)
    done_B = jnp.zeros((B,), bool) if eos_id is None else first_B == eos_id
    emit(0, first_B)

    def cond(carry):
        i, _, _, _, done_B, _ = carry
        return (i < N) & ~jnp.all(done_B)

    def step(carry):
        i, tok_B, cache, out_BxC, done_B, rng = carry
        logits_BxV, cache = model.step(tok_B, cache)
        rng, key = _split(rng, temperature)
        tok_B = sample_logits(logits_BxV, key, temperature=temperature, top_k=top_k, top_p=top_p)
        if eos_id is not None:
            tok_B = jnp.where(done_B, eos_id, tok_B)
            done_B = done_B | (tok_B == eos_id)
        out_BxC = jax.lax.dynamic_update_slice_in_dim(out_BxC, tok_B[:, None], i, axis=1)
        emit(i, tok_B)
        return i + 1, tok_B, cache, out_BxC, done_B, rng

    def body(carry):
        if check_every == 1:
            return step(carry)
        return jax.lax.fori_loop(0, check_every, lambda _, c: step(c), carry)

    carry = (jnp.asarray(1, jnp.int32), first_B, cache, out_BxC, done_B, rng)
    steps, _, cache, out_BxC, _, _ = jax.lax.while_loop(cond, body, carry)
    return out_BxC, cache, steps


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def decode_step(graphdef, state, cache, tokens_B, rng, *, temperature, top_k, top_p):
    """One whole-model decode step, for stepping from Python: feeds tokens_B, returns (next tokens
    [B], logits [B, V], cache)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.step(tokens_B, cache)
    return sample_logits(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p), logits, cache


# Streaming callbacks live here while their decode_loop runs; the compiled loop carries only the id,
# so a new callback object does not recompile it.
_STREAMS: dict[int, Callback] = {}
_STREAM_IDS = itertools.count(1)


def _emit(stream_id, i, n, tokens_B):
    if i < n:  # steps past N (check_every > 1) are not streamed
        _STREAMS[int(stream_id)](int(i), np.asarray(tokens_B))


@contextlib.contextmanager
def streaming(callback: Callback | None):
    """Yields the stream id (int32 scalar) to give decode_loop, with stream=callback is not None;
    on exit waits until every callback has run."""
    if callback is None:
        yield jnp.asarray(0, jnp.int32)
        return
    stream_id = next(_STREAM_IDS)
    _STREAMS[stream_id] = callback
    try:
        yield jnp.asarray(stream_id, jnp.int32)
        jax.effects_barrier()
    finally:
        _STREAMS.pop(stream_id, None)


# ------------------------------------------------------------------------------------ validation


def _integer(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def check_generate_args(vocab_size: int, prompt_BxP, *, max_new_tokens, temperature, top_k, top_p,
                        rng, prompt_lengths, eos_id, cache_len, check_every=1) -> dict:
    """Validates generate()'s arguments before anything is compiled; each bad one is a ValueError
    that names it. Returns the normalised values: tokens, segment_ids, cache_len and the static
    sampling options (top_k / top_p dropped for greedy decoding)."""
    tokens = np.asarray(prompt_BxP)
    if tokens.ndim != 2 or 0 in tokens.shape or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"prompt_tokens_BxP must be a non-empty [B, P] integer array, got "
                         f"shape {tokens.shape} dtype {tokens.dtype}")
    B, P = tokens.shape
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"prompt_tokens_BxP must hold ids in [0, {vocab_size}), got "
                         f"[{tokens.min()}, {tokens.max()}]")
    N = _integer("max_new_tokens", max_new_tokens)
    if N < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {N}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None:
        top_k = _integer("top_k", top_k)
        if not 1 <= top_k <= vocab_size:
            raise ValueError(f"top_k must be in [1, vocab_size = {vocab_size}] or None, got {top_k}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if temperature > 0 and rng is None:
        raise ValueError("rng must be a jax PRNG key when temperature > 0")
    segment_ids = None
    if prompt_lengths is not None:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"prompt_lengths must be an integer array of shape [B] = ({B},), got "
                             f"shape {lengths.shape} dtype {lengths.dtype}")
        if lengths.min() < 1 or lengths.max() > P:
            raise ValueError(f"prompt_lengths must lie in [1, P = {P}], got "
                             f"[{lengths.min()}, {lengths.max()}]")
        segment_ids = left_pad_segment_ids(lengths, P)
    if eos_id is not None:
        eos_id = _integer("eos_id", eos_id)
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id must be in [0, {vocab_size}) or None, got {eos_id}")
    need = P + N
    if cache_len is None:
        # Slots for the decode loop's whole compiled width, not for exactly N: prefill compiles per
        # cache_len, so calls whose budgets share a loop_capacity (eval's tasks, each with its own
        # answer length) share one prefill compile as they share one decode loop.
        cache_len = P + loop_capacity(N)
    elif _integer("cache_len", cache_len) < need:
        raise ValueError(f"cache_len = {cache_len} attention slots cannot hold the prompt (P = {P}) "
                         f"plus max_new_tokens = {N}: {need} tokens")
    if _integer("check_every", check_every) < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    greedy = temperature == 0
    return dict(tokens=jnp.asarray(tokens, jnp.int32), segment_ids=segment_ids,
                cache_len=int(cache_len), max_new_tokens=N, eos_id=eos_id,
                check_every=int(check_every),
                sampling=dict(temperature=float(temperature), top_k=None if greedy else top_k,
                              top_p=None if greedy or top_p is None else float(top_p)))


# ---------------------------------------------------------------------------------- the entry


def generate(model, prompt_tokens_BxP, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, rng: jax.Array | None = None,
             prompt_lengths=None, eos_id: int | None = None, callback: Callback | None = None,
             cache_len: int | None = None, check_every: int = 1) -> jax.Array:
    """Samples up to max_new_tokens tokens after each prompt, the loop on the device.

    Args:
      model: a gdn_jax.model.LM, ideally its inference copy (gdn_jax.inference.for_inference).
      prompt_tokens_BxP: int prompts [B, P], left-padded when prompt_lengths is given.
      max_new_tokens: N >= 1 tokens to generate per row.
      temperature: 0 for greedy decoding; otherwise logits are divided by it before sampling.
      top_k: keep the k most likely tokens, 1 <= k <= vocab; top_p: nucleus mass in (0, 1].
      rng: a jax PRNG key; needed when temperature > 0.
      prompt_lengths: [B] real prompt lengths in [1, P]; None means every row is a full prompt.
      eos_id: a row that emits it keeps emitting it; when every row has, the loop ends.
      callback: callback(i, tokens_B) on the host for each new token i (see the module docstring).
      cache_len: KV slots of the attention layers, at least P + N; default P + loop_capacity(N)
        (N rounded up to a power of two), so that calls with nearby budgets share their compiles.
      check_every: decode steps between tests of "N tokens out or every row done" (see
        decode_loop); outputs do not depend on it.
    Returns:
      [B, max_new_tokens] int32 new tokens (the prompt is not repeated).
    Raises:
      ValueError naming the bad argument, before anything is compiled.
    """
    a = check_generate_args(model.cfg.vocab_size, prompt_tokens_BxP, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, rng=rng,
                            prompt_lengths=prompt_lengths, eos_id=eos_id, cache_len=cache_len,
                            check_every=check_every)
    if not is_inference_copy(model):
        model = for_inference(model)
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    first_B, cache, rng = prefill(graphdef, state, a["tokens"], a["segment_ids"], rng,
                                  cache_len=a["cache_len"], **a["sampling"])
    N = a["max_new_tokens"]
    with streaming(callback) as stream_id:
        out, _, _ = decode_loop(graphdef, state, cache, first_B, rng, stream_id,
                                jnp.asarray(N, jnp.int32), capacity=loop_capacity(N),
                                eos_id=a["eos_id"], stream=callback is not None,
                                check_every=a["check_every"], **a["sampling"])
    return out[:, :N]


def loop_capacity(max_new_tokens: int) -> int:
    """The output width decode_loop is compiled for: max_new_tokens rounded up to a power of two,
    at least 64, so calls with different token budgets share a compile (eval's needle tasks ask for
    4 to 40 new tokens each). Only N = max_new_tokens steps run; the width costs B * 64 int32 of
    output and, through the default cache_len, 64 attention slots."""
    return max(64, 1 << (max_new_tokens - 1).bit_length())
