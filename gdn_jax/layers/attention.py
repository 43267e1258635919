"""Causal softmax attention with RoPE: full ("A") or sliding-window ("S").

Scores come from `jax.nn.dot_product_attention`: `is_causal` plus `local_window_size=(W-1, 0)` for
the window, and a boolean `mask` of same-document pairs when segment_ids are given, so no token
reads another packed document. RoPE (rotate-half, float32) uses per-document positions.

Context parallelism (a mesh with a `context` axis, gdn_jax/context_parallel.py): each device attends
from its own queries to the keys and values of all devices (all-gathered), or, for a window that
fits in one device's share (window - 1 <= T / devices), to its own and a halo of the previous
device's last window - 1; a mask of global positions keeps it causal, windowed and per document.

Decode keeps a KV cache of L slots per layer, token at absolute step t in slot t % L: L is the
window for SWA (a rolling window) and the whole generation length for full attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gdn_jax import context_parallel
from gdn_jax.layers.mlp import FusedLinear, linear


def rope(x_BxTxNxD: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half layout, in float32; returns x's dtype."""
    D = x_BxTxNxD.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)  # [D/2]
    ang = positions_BxT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
    x = x_BxTxNxD.astype(jnp.float32)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxD.dtype)


class Attention(nnx.Module):
    """Multi-head (GQA-capable) causal attention; window=None means full attention."""

    def __init__(self, cfg, *, window: int | None, rngs: nnx.Rngs):
        d, N, KV, D = cfg.d_model, cfg.attn_num_heads, cfg.kv_heads, cfg.attn_head_dim
        dt, std = jnp.dtype(cfg.dtype), cfg.init_std
        self.num_heads, self.num_kv_heads, self.head_dim = N, KV, D
        self.window, self.theta = window, cfg.rope_theta
        self.impl = cfg.attn_impl
        self.q_proj = linear(d, N * D, ("embed", "heads"), std=std, dtype=dt, rngs=rngs)
        self.k_proj = linear(d, KV * D, ("embed", "heads"), std=std, dtype=dt, rngs=rngs)
        self.v_proj = linear(d, KV * D, ("embed", "heads"), std=std, dtype=dt, rngs=rngs)
        self.o_proj = linear(N * D, d, ("heads", "embed"), std=std, dtype=dt, rngs=rngs)
        self.qkv_proj = nnx.data(None)  # FusedLinear of q/k/v_proj, inference only

    def fuse_for_inference(self):
        if self.qkv_proj is not None:  # fused already
            return
        self.qkv_proj = FusedLinear([self.q_proj, self.k_proj, self.v_proj])
        self.q_proj = self.k_proj = self.v_proj = None

    def _qkv(self, x, positions):
        lead = x.shape[:-1]
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x)
        q = q.reshape(*lead, self.num_heads, self.head_dim)
        k = k.reshape(*lead, self.num_kv_heads, self.head_dim)
        v = v.reshape(*lead, self.num_kv_heads, self.head_dim)
        return rope(q, positions, self.theta), rope(k, positions, self.theta), v

    def __call__(self, x_BxTxD: jax.Array, *, segment_ids=None, positions=None, cache_len=None):
        """Returns (y [B, T, d], cache or None); cache_len = decode length (prompt + new tokens)."""
        B, T, _ = x_BxTxD.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        q, k, v = self._qkv(x_BxTxD, positions)
        if context_parallel.context_size() > 1:
            if cache_len is not None:
                raise ValueError("Attention: prefill (cache_len) does not run context-parallel; "
                                 "use a mesh without a context axis")
            o = context_parallel.over_context(self._attend_segment)(q, k, v, segment_ids)
            return self.o_proj(o.reshape(B, T, -1)), None
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        window = None if self.window is None else (self.window - 1, 0)
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                         local_window_size=window, implementation=self.impl)
        y = self.o_proj(o.reshape(B, T, -1))
        cache = None
        if cache_len is not None:
            valid = (jnp.ones((B, T), bool) if segment_ids is None
                     else segment_ids == segment_ids[:, -1:])
            cache = self._prefill_cache(k, v, valid, cache_len)
        return y, cache

    def _attend_segment(self, q, k, v, segment_ids):
        """One device's queries [B, T_l, N, D] against the keys they can see, inside
        context_parallel.over_context; returns [B, T_l, N, D]."""
        axis = context_parallel.CONTEXT_AXIS
        B, T_l = q.shape[:2]
        start = jax.lax.axis_index(axis) * T_l
        q_pos = start + jnp.arange(T_l)
        seg = jnp.zeros((B, T_l), jnp.int32) if segment_ids is None else segment_ids
        if self.window is not None and self.window - 1 <= T_l:
            halo = lambda x: jnp.concatenate(
                [context_parallel.from_previous(x, self.window - 1), x], axis=1)
            k_all, v_all, seg_all = halo(k), halo(v), halo(seg)
            k_pos = start - (self.window - 1) + jnp.arange(k_all.shape[1])
        else:
            gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
            k_all, v_all, seg_all = gather(k), gather(v), gather(seg)
            k_pos = jnp.arange(k_all.shape[1])
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= 0)
        if self.window is not None:
            visible &= q_pos[:, None] - k_pos[None, :] < self.window
        mask = visible[None, None] & (seg[:, None, :, None] == seg_all[:, None, None, :])
        return jax.nn.dot_product_attention(q, k_all, v_all, mask=mask, implementation=self.impl)

    def cache_slots(self, cache_len: int) -> int:
        return cache_len if self.window is None else min(self.window, cache_len)

    def _prefill_cache(self, k, v, valid, cache_len):
        """Places prompt position p in slot p % L, keeping the last L positions."""
        T = k.shape[1]
        L = self.cache_slots(cache_len)
        if T >= L:
            shift = (T - L) % L
            k, v, valid = (jnp.roll(a[:, T - L:], shift, axis=1) for a in (k, v, valid))
        else:
            pad = lambda a: jnp.pad(a, [(0, 0), (0, L - T)] + [(0, 0)] * (a.ndim - 2))
            k, v, valid = pad(k), pad(v), pad(valid)
        return dict(k=k, v=v, valid=valid)

    def step(self, x_BxD: jax.Array, cache: dict, *, pos, t):
        """One token at absolute step t (scalar) and per-row document position pos [B]."""
        B = x_BxD.shape[0]
        q, k, v = self._qkv(x_BxD[:, None], pos[:, None])
        L = cache["k"].shape[1]
        slot = t % L
        ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), slot, 1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), slot, 1)
        valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], jnp.ones((B, 1), bool), slot, 1)
        o = jax.nn.dot_product_attention(q, ck, cv, mask=valid[:, None, None, :])
        return self.o_proj(o.reshape(B, -1)), dict(k=ck, v=cv, valid=valid)
