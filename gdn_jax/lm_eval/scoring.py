"""Log-likelihood of token rows: batched parallel forwards, and the recurrence past max_length.

A row is ids x_0..x_{n-1} and the index s >= 1 of its first scored token:

    logp   = sum_{t=s}^{n-1} log p(x_t | x_<t)               (float32 terms, float64 sum)
    greedy = all_{t=s}^{n-1} argmax_v p(v | x_<t) == x_t      (True when nothing is scored)

Rows whose n - 1 inputs fit in max_length are sorted longest first and scored batch_size at a time
in one forward pass of shape [batch_size, T], T being the longest row's inputs rounded up to a
bucket (2^k or 3·2^(k-1), at least 32) so that few shapes compile. Real tokens have segment id 1;
pad columns and the pad rows of a short last batch have segment id 0, so the model restarts its
state there and no real position reads a pad.

Longer rows are never cut. One at a time, the parallel prefill reads the first max_length inputs
and returns the decode cache, and the model's own decode step (LM.step, the recurrence: GDN /
Mamba2 states, SWA's rolling window, full attention's KV slots) carries it over the rest, in
compiled scans of STEP_PIECE tokens. Only [B, T] log-probabilities and greedy flags leave the
device; the [B, T, V] logits of one forward pass are what max_length bounds.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

STEP_PIECE = 256  # decode steps per compiled scan on the long-row path

Row = tuple[Sequence[int], int]  # (ids, index of the first scored token)
Progress = Callable[[int, int], None]  # (rows done, tokens read) after each forward pass


def bucket(n: int, floor: int = 32) -> int:
    """The smallest of floor, 2^k and 3·2^(k-1) (k >= 1) that is >= n."""
    if n <= floor:
        return floor
    p = 1 << (n - 1).bit_length()
    return p * 3 // 4 if p * 3 // 4 >= n else p


def target_logprobs(logits_BxTxV: jax.Array, targets_BxT: jax.Array):
    """(log p(target) float32 [B, T], argmax == target [B, T])."""
    logits = logits_BxTxV.astype(jnp.float32)
    picked_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    logp_BxT = picked_BxT - jax.nn.logsumexp(logits, axis=-1)
    return logp_BxT, jnp.argmax(logits, axis=-1) == targets_BxT


@functools.partial(jax.jit, static_argnames=("graphdef",))
def forward_logprobs(graphdef, state, tokens_BxT, targets_BxT, segment_ids_BxT):
    logits_BxTxV = nnx.merge(graphdef, state)(tokens_BxT, segment_ids=segment_ids_BxT)
    return target_logprobs(logits_BxTxV, targets_BxT)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def prefill_logprobs(graphdef, state, tokens_1xL, targets_1xL, *, cache_len):
    """The first L inputs of a long row: their log-probabilities, and the cache after them."""
    logits_1xLxV, cache = nnx.merge(graphdef, state).prefill(tokens_1xL, cache_len=cache_len)
    return *target_logprobs(logits_1xLxV, targets_1xL), cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def step_logprobs(graphdef, state, cache, tokens_S, targets_S):
    """S decode steps from `cache` (batch 1): log-probabilities [S], greedy flags [S], cache."""
    model = nnx.merge(graphdef, state)

    def body(cache, x_y):
        logits_1xV, cache = model.step(x_y[0][None], cache)
        logp_1, greedy_1 = target_logprobs(logits_1xV[:, None], x_y[1][None, None])
        return cache, (logp_1[0, 0], greedy_1[0, 0])

    cache, (logp_S, greedy_S) = jax.lax.scan(body, cache, (tokens_S, targets_S))
    return logp_S, greedy_S, cache


class Scorer:
    """Scores rows (see the module docstring) with `model`, an LM in its compute dtype."""

    def __init__(self, model: nnx.Module, *, batch_size: int, max_length: int | None):
        self.graphdef, self.state = nnx.split(model)
        self.batch_size = batch_size
        self.max_length = max_length
        self.long_rows = 0  # rows that took the recurrent path, for the caller's log

    def score(self, rows: Sequence[Row], progress: Progress | None = None
              ) -> list[tuple[float, bool]]:
        """(logp, greedy) of every row, in the order given."""
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        done = [0, 0]  # rows, tokens

        def finished(indices, read=True):
            done[0] += len(indices)
            done[1] += sum(len(rows[i][0]) - 1 for i in indices) if read else 0
            if progress:
                progress(*done)

        batched = []
        for i in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])):
            ids, s = rows[i]
            if not 1 <= s <= len(ids):
                raise ValueError(f"row {i}: first scored index {s} outside [1, {len(ids)}]")
            if s == len(ids):  # nothing to score: the empty continuation has probability 1
                out[i] = (0.0, True)
                finished([i], read=False)
            elif self.max_length is not None and len(ids) - 1 > self.max_length:
                out[i] = self._score_long(np.asarray(ids, np.int32), s)
                self.long_rows += 1
                finished([i])
            else:
                batched.append(i)
        batches = [batched[b:b + self.batch_size] for b in range(0, len(batched), self.batch_size)]
        # Batch k + 1 is dispatched before batch k is read back, so the device does not wait while
        # the host packs a batch.
        pending = None
        for batch in batches + [None]:
            launched = batch and (batch, self._launch([rows[i] for i in batch]))
            if pending:
                indices, arrays = pending
                for i, result in zip(indices, self._collect([rows[i] for i in indices], arrays)):
                    out[i] = result
                finished(indices)
            pending = launched
        return out

    def _launch(self, rows: Sequence[Row]):
        """Packs rows into [batch_size, T] and dispatches the forward pass (does not wait)."""
        longest = max(len(ids) - 1 for ids, _ in rows)
        T = bucket(longest)
        if self.max_length is not None:
            T = min(T, self.max_length)
        shape = (self.batch_size, T)
        tokens, targets, segs = (np.zeros(shape, np.int32) for _ in range(3))
        for r, (ids, _) in enumerate(rows):
            ids = np.asarray(ids, np.int32)
            n = len(ids) - 1
            tokens[r, :n], targets[r, :n], segs[r, :n] = ids[:-1], ids[1:], 1
        return forward_logprobs(self.graphdef, self.state, tokens, targets, segs)

    @staticmethod
    def _collect(rows: Sequence[Row], arrays) -> list[tuple[float, bool]]:
        logp, greedy = np.asarray(arrays[0], np.float64), np.asarray(arrays[1])
        # Target x_t sits in column t - 1.
        spans = [(r, slice(s - 1, len(ids) - 1)) for r, (ids, s) in enumerate(rows)]
        return [(float(logp[r, cols].sum()), bool(greedy[r, cols].all())) for r, cols in spans]

    def _score_long(self, ids: np.ndarray, s: int) -> tuple[float, bool]:
        L, n = self.max_length, len(ids)
        x, y = ids[:-1], ids[1:]
        # Attention layers keep KV slots for the whole row; recurrent layers ignore cache_len.
        logp_1xL, greedy_1xL, cache = prefill_logprobs(self.graphdef, self.state, x[None, :L],
                                                       y[None, :L], cache_len=bucket(n))
        logp, greedy = [np.asarray(logp_1xL[0], np.float64)], [np.asarray(greedy_1xL[0])]
        for a in range(L, n - 1, STEP_PIECE):
            m = min(STEP_PIECE, n - 1 - a)
            xs, ys = np.zeros(STEP_PIECE, np.int32), np.zeros(STEP_PIECE, np.int32)
            xs[:m], ys[:m] = x[a:a + m], y[a:a + m]
            # Steps past the row's end only touch the cache, which is dropped after the last piece.
            logp_S, greedy_S, cache = step_logprobs(self.graphdef, self.state, cache, xs, ys)
            logp.append(np.asarray(logp_S, np.float64)[:m])
            greedy.append(np.asarray(greedy_S)[:m])
        logp, greedy = np.concatenate(logp)[s - 1:], np.concatenate(greedy)[s - 1:]
        return float(logp.sum()), bool(greedy.all())
