"""Mamba2 mixer: scalar-decay SSD per head, chunked in plain JAX with a float32 state.

For input x [B, T, d], with d_inner = expand * d, H = d_inner / P heads and G groups:
    z, xBC, dt = split(x W_in)                 xBC = silu(conv(xBC)) -> x [B,T,H,P], B, C [B,T,G,N]
    dt = softplus(dt + dt_bias), a_t = exp(-exp(A_log) dt_t)                      [B, T, H]
    h_t = a_t h_{t-1} + dt_t x_t B_t^T    (h [B, H, P, N], float32)
    y_t = h_t C_t + D x_t
    out = RMSNorm(y * silu(z)) W_out      (Mamba2's norm_before_gate=False)
With segment_ids the state restarts at each new document and the conv reads nothing across one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gdn_jax import context_parallel
from gdn_jax.layers.conv import ShortConv, document_index
from gdn_jax.layers.gated_deltanet import init_decay_params
from gdn_jax.layers.mlp import linear
from gdn_jax.layers.norms import GatedRMSNorm, small_param

_HIGHEST = jax.lax.Precision.HIGHEST


def _expand_groups(x_BxTxGxN, num_heads):
    return jnp.repeat(x_BxTxGxN, num_heads // x_BxTxGxN.shape[-2], axis=-2)


def ssd_scan(x, dt, A, Bm, Cm, *, doc=None, initial_state=None):
    """Reference recurrence, token by token. x [B,T,H,P], dt [B,T,H], A [H] (< 0), Bm/Cm [B,T,H,N].

    Returns (y [B,T,H,P] float32 without the D skip, final state [B,H,P,N] float32).
    """
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    h0 = jnp.zeros((Bsz, H, P, N), jnp.float32) if initial_state is None else initial_state
    keep = jnp.ones((Bsz, T), jnp.float32) if doc is None else jnp.concatenate(
        [jnp.ones((Bsz, 1), jnp.float32), (doc[:, 1:] == doc[:, :-1]).astype(jnp.float32)], axis=1)
    f32 = lambda a: jnp.moveaxis(a.astype(jnp.float32), 1, 0)

    def step(h, xs):
        x_t, dt_t, B_t, C_t, keep_t = xs
        h = h * keep_t[:, None, None, None] * jnp.exp(dt_t * A)[..., None, None]
        h = h + jnp.einsum("bh,bhp,bhn->bhpn", dt_t, x_t, B_t, precision=_HIGHEST)
        return h, jnp.einsum("bhpn,bhn->bhp", h, C_t, precision=_HIGHEST)

    h, y = jax.lax.scan(step, h0, (f32(x), f32(dt), f32(Bm), f32(Cm), jnp.moveaxis(keep, 1, 0)))
    return jnp.moveaxis(y, 0, 1), h


def ssd_chunked(x, dt, A, Bm, Cm, *, doc=None, chunk_size=64, initial_state=None):
    """The same function as `ssd_scan`, chunkwise: quadratic inside a chunk, a scan across chunks.

    Inside a chunk with cumulative log-decay L_i = sum_{s<=i} dt_s A:
      y_i = C_i . (e^{L_i} h_prev) [same doc as the chunk start] + sum_{j<=i, same doc}
            (C_i . B_j) e^{L_i - L_j} dt_j x_j
    The decay exponent is masked before exp, so it never overflows.
    """
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    C = chunk_size
    pad = -T % C
    if doc is None:
        doc = jnp.zeros((Bsz, T), jnp.int32)
    if pad:
        padt = lambda a, v=0: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2),
                                      constant_values=v)
        x, dt, Bm, Cm = padt(x), padt(dt), padt(Bm), padt(Cm)
        doc = padt(doc, 0)
        doc = doc.at[:, T:].set(doc[:, T - 1:T])  # dt = 0 there: the state passes through
    nc = (T + pad) // C
    chunks = lambda a: jnp.moveaxis(a.astype(jnp.float32).reshape(Bsz, nc, C, *a.shape[2:]), 1, 0)
    xs, dts, Bs, Cs = chunks(x), chunks(dt), chunks(Bm), chunks(Cm)
    docs = jnp.moveaxis(doc.reshape(Bsz, nc, C), 1, 0)
    prev_doc = jnp.concatenate([doc[:, :1], doc[:, C - 1::C][:, :-1]], axis=1)  # [B, nc]
    prev_docs = jnp.moveaxis(prev_doc, 1, 0)
    h0 = jnp.zeros((Bsz, H, P, N), jnp.float32) if initial_state is None else initial_state
    causal = jnp.tril(jnp.ones((C, C), bool))

    def body(h, inp):
        x_c, dt_c, B_c, C_c, doc_c, pdoc = inp  # [B,C,H,P], [B,C,H], [B,C,H,N] x2, [B,C], [B]
        l = jnp.cumsum(dt_c * A, axis=1)  # [B, C, H]
        same = (doc_c[:, :, None] == doc_c[:, None, :]) & causal  # [B, Ci, Cj]
        diff = l[:, :, None, :] - l[:, None, :, :]  # [B, Ci, Cj, H]
        decay = jnp.exp(jnp.where(same[..., None], diff, -jnp.inf))
        scores = jnp.einsum("bihn,bjhn->bijh", C_c, B_c, precision=_HIGHEST) * decay
        y = jnp.einsum("bijh,bjh,bjhp->bihp", scores, dt_c, x_c, precision=_HIGHEST)
        from_prev = (doc_c == pdoc[:, None])  # [B, C]
        carry_w = jnp.where(from_prev[..., None], jnp.exp(l), 0.0)  # [B, C, H]
        y = y + jnp.einsum("bihn,bhpn,bih->bihp", C_c, h, carry_w, precision=_HIGHEST)
        last = doc_c[:, -1:]
        in_last = (doc_c == last)  # [B, C]
        w_end = jnp.where(in_last[..., None], jnp.exp(l[:, -1:] - l), 0.0) * dt_c  # [B, C, H]
        keep = jnp.where(last[:, 0] == pdoc, 1.0, 0.0)[:, None] * jnp.exp(l[:, -1])  # [B, H]
        h = h * keep[..., None, None] + jnp.einsum("bjh,bjhp,bjhn->bhpn", w_end, x_c, B_c,
                                                    precision=_HIGHEST)
        return h, y

    h, ys = jax.lax.scan(body, h0, (xs, dts, Bs, Cs, docs, prev_docs))
    y = jnp.moveaxis(ys, 0, 1).reshape(Bsz, nc * C, H, P)[:, :T]
    return y, h


class Mamba2(nnx.Module):
    """The "M" mixer. Config fields mamba_*."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, E = cfg.d_model, cfg.mamba_d_inner
        H, P, G, N = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.mamba_n_groups, cfg.mamba_d_state
        dt, std = jnp.dtype(cfg.dtype), cfg.init_std
        self.d_inner, self.num_heads, self.head_dim, self.n_groups, self.d_state = E, H, P, G, N
        self.chunk_size, self.dtype = cfg.mamba_chunk_size, dt
        self.in_proj = linear(d, 2 * E + 2 * G * N + H, ("embed", "heads"), std=std, dtype=dt,
                              rngs=rngs)
        self.conv = ShortConv(E + 2 * G * N, cfg.mamba_conv_size, std=std, use_bias=True, rngs=rngs)
        A_log, dt_bias = init_decay_params(rngs.params(), H, a_min=1.0)  # Mamba2: A ~ U(1, 16)
        self.A_log = small_param(A_log)
        self.dt_bias = small_param(dt_bias)
        self.D = small_param(jnp.ones((H,), jnp.float32))
        self.norm = GatedRMSNorm(E // G, eps=cfg.norm_eps, norm_before_gate=False)
        self.out_proj = linear(E, d, ("heads", "embed"), std=std, dtype=dt, rngs=rngs)

    def fuse_for_inference(self):
        """Nothing to do: in_proj already computes z, x, B, C and dt in one matmul."""

    def _split(self, zxbcdt):
        E, GN = self.d_inner, self.n_groups * self.d_state
        return zxbcdt[..., :E], zxbcdt[..., E:2 * E + 2 * GN], zxbcdt[..., 2 * E + 2 * GN:]

    def _heads(self, xBC, dt_raw):
        E, G, N, H, P = self.d_inner, self.n_groups, self.d_state, self.num_heads, self.head_dim
        lead = xBC.shape[:-1]
        x = xBC[..., :E].reshape(*lead, H, P)
        Bm = _expand_groups(xBC[..., E:E + G * N].reshape(*lead, G, N), H)
        Cm = _expand_groups(xBC[..., E + G * N:].reshape(*lead, G, N), H)
        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias[...])
        return x, Bm, Cm, dt

    def _output(self, y, x, z):
        y = y + self.D[...][:, None] * x.astype(jnp.float32)
        lead = z.shape[:-1]
        G = self.n_groups
        y = self.norm(y.reshape(*lead, G, -1), z.reshape(*lead, G, -1)).reshape(*lead, -1)
        return self.out_proj(y.astype(self.dtype))

    def __call__(self, x_BxTxD: jax.Array, *, segment_ids=None, positions=None, cache_len=None):
        del positions
        if context_parallel.context_size() > 1:
            raise ValueError("Mamba2 (layer letter M) has no context parallelism; use a mesh "
                             "without a context axis, or a model without M layers")
        want = cache_len is not None
        z, xBC, dt_raw = self._split(self.in_proj(x_BxTxD))
        xBC, conv_cache = self.conv(xBC, segment_ids=segment_ids, return_cache=want)
        x, Bm, Cm, dt = self._heads(xBC, dt_raw)
        doc = None if segment_ids is None else document_index(segment_ids)
        A = -jnp.exp(self.A_log[...])
        y, h = ssd_chunked(x, dt, A, Bm, Cm, doc=doc, chunk_size=self.chunk_size)
        cache = dict(conv=conv_cache, state=h) if want else None
        return self._output(y, x, z), cache

    def step(self, x_BxD: jax.Array, cache: dict, *, pos=None, t=None):
        del pos, t
        z, xBC, dt_raw = self._split(self.in_proj(x_BxD))
        xBC, conv_cache = self.conv.step(xBC, cache["conv"])
        x, Bm, Cm, dt = self._heads(xBC, dt_raw)
        A = -jnp.exp(self.A_log[...])
        xf = x.astype(jnp.float32)
        h = cache["state"] * jnp.exp(dt * A)[..., None, None]
        h = h + jnp.einsum("bh,bhp,bhn->bhpn", dt, xf, Bm.astype(jnp.float32), precision=_HIGHEST)
        y = jnp.einsum("bhpn,bhn->bhp", h, Cm.astype(jnp.float32), precision=_HIGHEST)
        return self._output(y, x, z), dict(conv=conv_cache, state=h)
