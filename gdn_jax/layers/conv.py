"""Causal depthwise short convolution (kernel W, a few tokens) with a decode cache.

    y_t[c] = sum_{i=0}^{W-1} w[i, c] * x_{t-W+1+i}[c]  (+ b[c])

Inputs before the sequence come from `cache` (the previous W - 1 inputs) or are zero. With
segment_ids, an input from another document than token t counts as zero, so nothing leaks across
packed documents; the cache belongs to each row's first document, unless `cache_segment_ids` say
which documents its tokens belong to (a context-parallel halo from the previous device).

impl (gdn_jax.impls.CONV_IMPLS): "pallas" runs the forward without a cache, with SiLU and no bias,
through kernels_pallas/short_conv.py (forward and backward kernels); everything else is jax.numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gdn_jax.impls import resolve_conv
from gdn_jax.layers.norms import small_param


def document_index(segment_ids_BxT: jax.Array) -> jax.Array:
    """[B, T] int32: 0, 1, 2, ... counting the places where the segment id changes."""
    changed = segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]
    return jnp.concatenate([jnp.zeros_like(segment_ids_BxT[:, :1], jnp.int32),
                            jnp.cumsum(changed, axis=1, dtype=jnp.int32)], axis=1)


class ShortConv(nnx.Module):
    """Depthwise causal conv over time on [B, T, C]; weight [W, C] (unsharded, small)."""

    def __init__(self, channels: int, kernel_size: int, *, std: float, use_bias: bool = False,
                 activation: bool = True, impl: str = "auto", rngs: nnx.Rngs):
        w = std * jax.random.normal(rngs.params(), (kernel_size, channels), jnp.float32)
        self.weight = small_param(w)
        self.bias = small_param(jnp.zeros((channels,), jnp.float32)) if use_bias else None
        self.kernel_size = kernel_size
        self.activation = activation
        self.impl = resolve_conv(impl)  # gdn_jax.impls.CONV_IMPLS

    def _finish(self, y, dtype):
        if self.bias is not None:
            y = y + self.bias[...]
        if self.activation:
            y = jax.nn.silu(y)
        return y.astype(dtype)

    def __call__(self, x_BxTxC: jax.Array, *, segment_ids=None, cache=None,
                 cache_segment_ids=None, return_cache: bool = False):
        """Returns (y [B, T, C] in x's dtype, new cache [B, W-1, C] or None).

        cache_segment_ids [B, W-1]: segment ids of the cache's tokens, which then count only where
        they continue token t's document; without them the cache continues the first document."""
        B, T, C = x_BxTxC.shape
        W = self.kernel_size
        if self._kernel_runs(B * T, C, cache, return_cache):
            return self._pallas(x_BxTxC, segment_ids), None
        if cache is None:
            cache = jnp.zeros((B, W - 1, C), x_BxTxC.dtype)
        xp = jnp.concatenate([cache.astype(x_BxTxC.dtype), x_BxTxC], axis=1)  # [B, T+W-1, C]
        doc = None
        if segment_ids is not None and cache_segment_ids is not None:
            doc = document_index(jnp.concatenate([cache_segment_ids, segment_ids], axis=1))
        elif segment_ids is not None:
            doc = document_index(segment_ids)
            doc = jnp.concatenate([jnp.zeros((B, W - 1), jnp.int32), doc], axis=1)
        w = self.weight[...]
        y = jnp.zeros((B, T, C), jnp.float32)
        for i in range(W):
            src = xp[:, i:i + T].astype(jnp.float32)
            if doc is not None and i < W - 1:
                src = jnp.where((doc[:, i:i + T] == doc[:, W - 1:])[..., None], src, 0.0)
            y = y + src * w[i]
        new_cache = None
        if return_cache:
            new_cache = xp[:, T:]
            if doc is not None:
                same = doc[:, T:] == doc[:, -1:]
                new_cache = jnp.where(same[..., None], new_cache, 0)
        return self._finish(y, x_BxTxC.dtype), new_cache

    def _kernel_runs(self, N, C, cache, return_cache) -> bool:
        from kernels_pallas.short_conv import unsupported_reason
        return (self.impl == "pallas" and cache is None and not return_cache and self.activation
                and self.bias is None and unsupported_reason(N, C, self.kernel_size) is None)

    def _pallas(self, x_BxTxC, segment_ids):
        """The same function through kernels_pallas/short_conv.py, on the flattened rows: the rows
        of one batch row share a document id only with each other (B * T + document index)."""
        from kernels_pallas.short_conv import short_conv_silu
        B, T, C = x_BxTxC.shape
        doc = jnp.zeros((B, T), jnp.int32) if segment_ids is None else document_index(segment_ids)
        doc = doc + T * jnp.arange(B, dtype=jnp.int32)[:, None]
        y = short_conv_silu(x_BxTxC.reshape(B * T, C), self.weight[...], doc.reshape(B * T))
        return y.reshape(B, T, C)

    def step(self, x_BxC: jax.Array, cache_BxWm1xC: jax.Array):
        """One token: returns (y [B, C], new cache [B, W-1, C])."""
        xp = jnp.concatenate([cache_BxWm1xC.astype(x_BxC.dtype), x_BxC[:, None]], axis=1)
        # Multiply and sum, not a dot: as an einsum it was a batched dot over the channels with a
        # W-long contraction (a GEMM launch of its own per conv per token on a GPU, and TF32 for
        # float32), where this fuses with the activation like the parallel path's shifted sums.
        y = jnp.sum(xp.astype(jnp.float32) * self.weight[...], axis=1)
        return self._finish(y, x_BxC.dtype), xp[:, 1:]
