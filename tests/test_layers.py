"""Mixer-level tests: float64 NumPy references, causality, packed documents, impl agreement."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs.model import get_model_config
from gdn_jax.layers import Attention, GatedRMSNorm, RMSNorm, ShortConv, make_mixer
from gdn_jax.layers.mamba2 import ssd_chunked, ssd_scan

MIXERS = ["G", "D", "M", "S", "A"]


def f32_cfg(**kw):
    kw = {"dtype": "float32", "gdn_impl": "chunk", "window_size": 8, **kw}
    return get_model_config("tiny", **kw)


def make(kind, **kw):
    return make_mixer(kind, f32_cfg(**kw), rngs=nnx.Rngs(0))


def run(mixer, x, segment_ids=None):
    return np.asarray(nnx.jit(lambda m, x, s: m(x, segment_ids=s)[0])(mixer, x, segment_ids))


def rand(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ---------- float64 NumPy references, sharing no code with the layers ----------

def np_silu(x):
    return x / (1 + np.exp(-x))


def np_softplus(x):
    return np.log1p(np.exp(x))


def np_conv(x, w, bias=None, act=True):
    B, T, C = x.shape
    W = w.shape[0]
    xp = np.concatenate([np.zeros((B, W - 1, C)), x], axis=1)
    y = sum(xp[:, i:i + T] * w[i] for i in range(W))
    if bias is not None:
        y = y + bias
    return np_silu(y) if act else y


def np_gdn_layer(m, x, decay=True, neg_eigval=False):
    """The whole GDN / DeltaNet layer in float64, loop over t, from the module's parameters."""
    p = lambda a: np.asarray(a[...], np.float64)
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    H, K, HV, V = m.num_heads, m.head_dim, m.num_v_heads, m.v_dim
    q = np_conv(x @ p(m.q_proj.kernel), p(m.q_conv.weight)).reshape(B, T, H, K)
    k = np_conv(x @ p(m.k_proj.kernel), p(m.k_conv.weight)).reshape(B, T, H, K)
    v = np_conv(x @ p(m.v_proj.kernel), p(m.v_conv.weight)).reshape(B, T, HV, V)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    beta = 1 / (1 + np.exp(-(x @ p(m.b_proj.kernel))))
    if neg_eigval:
        beta = 2 * beta
    if decay:
        g = -np.exp(p(m.A_log)) * np_softplus(x @ p(m.a_proj.kernel) + p(m.dt_bias))
    else:
        g = np.zeros_like(beta)
    o = np.zeros((B, T, HV, V))
    for b in range(B):
        for j in range(HV):
            h = j // (HV // H)
            S = np.zeros((K, V))
            for t in range(T):
                kt = k[b, t, h][:, None]
                S = np.exp(g[b, t, j]) * (np.eye(K) - beta[b, t, j] * kt @ kt.T) @ S \
                    + beta[b, t, j] * kt @ v[b, t, j][None]
                o[b, t, j] = S.T @ (q[b, t, h] * K ** -0.5)
    gate = (x @ p(m.g_proj.kernel)).reshape(B, T, HV, V)
    o = o / np.sqrt((o * o).mean(-1, keepdims=True) + 1e-5) * p(m.o_norm.scale) * np_silu(gate)
    return o.reshape(B, T, -1) @ p(m.o_proj.kernel)


@pytest.mark.parametrize("kind,neg", [("G", False), ("D", False), ("G", True)])
def test_gdn_layer_matches_float64_reference(kind, neg):
    # GVA: 2 value heads read 1 q/k head.
    m = make(kind, gdn_num_heads=1, gdn_num_v_heads=2, gdn_allow_neg_eigval=neg)
    x = rand((2, 21, 64), 1)
    np.testing.assert_allclose(run(m, x), np_gdn_layer(m, x, decay=kind == "G", neg_eigval=neg),
                               rtol=1e-4, atol=1e-5)


def test_deltanet_has_no_decay_params():
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(make("D"), nnx.Param))}
    assert not any(n.startswith(("A_log", "dt_bias", "a_proj")) for n in names)


@pytest.mark.parametrize("a_max,dt_min,dt_max", [(16.0, 1e-3, 0.1), (1.0, 1e-4, 1e-3)])
def test_gdn_decay_init_follows_config(a_max, dt_min, dt_max):
    m = make("G", gdn_num_heads=64, gdn_head_dim=4, gdn_A_init_max=a_max, gdn_dt_init_min=dt_min,
             gdn_dt_init_max=dt_max)
    A = np.exp(np.asarray(m.A_log[...]))
    dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
    assert 0.0 <= A.min() and A.max() <= a_max and A.max() > 0.5 * a_max
    np.testing.assert_array_less(dt_min * (1 - 1e-4), dt)
    np.testing.assert_array_less(dt, dt_max * (1 + 1e-4))
    # log-uniform: about half the heads below the geometric mean of the range
    assert 0.3 < np.mean(dt < np.sqrt(dt_min * dt_max)) < 0.7


def test_decay_init_range_is_validated():
    with pytest.raises(ValueError, match="gdn_dt_init_min"):
        f32_cfg(gdn_dt_init_min=0.2, gdn_dt_init_max=0.1)
    with pytest.raises(ValueError, match="gdn_A_init_max"):
        f32_cfg(gdn_A_init_max=0.0)


def test_short_conv_matches_reference_and_step():
    conv = ShortConv(5, 4, std=0.5, use_bias=True, rngs=nnx.Rngs(3))
    conv.bias[...] = jnp.arange(5.0) / 10
    x = rand((2, 9, 5), 2)
    y, cache = conv(x, return_cache=True)
    ref = np_conv(np.asarray(x, np.float64), np.asarray(conv.weight[...]), np.asarray(conv.bias[...]))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    # Split the sequence: prefix with cache, then token-by-token steps.
    _, c = conv(x[:, :2], return_cache=True)
    for t in range(2, 9):
        y_t, c = conv.step(x[:, t], c)
        np.testing.assert_allclose(y_t, ref[:, t], rtol=1e-5, atol=1e-6)
    # The step is elementwise work (it fuses on a GPU), not a batched dot over the channels.
    step_eqns = jax.make_jaxpr(conv.step)(x[:, 0], c).jaxpr.eqns
    assert not [e for e in step_eqns if e.primitive.name == "dot_general"]


def test_norms_match_reference():
    x, z = rand((3, 8), 4), rand((3, 8), 5)
    xn, zn = np.asarray(x, np.float64), np.asarray(z, np.float64)
    rms = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(RMSNorm(8)(x), rms, rtol=1e-5)
    np.testing.assert_allclose(GatedRMSNorm(8)(x, z), rms * np_silu(zn), rtol=1e-5)
    xz = xn * np_silu(zn)
    np.testing.assert_allclose(GatedRMSNorm(8, norm_before_gate=False)(x, z),
                               xz / np.sqrt((xz ** 2).mean(-1, keepdims=True) + 1e-5), rtol=1e-5)


def np_attention(q, k, v, seg, window):
    """Softmax attention in float64 with explicit causal / window / same-document masks."""
    B, T, N, D = q.shape
    G = N // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("bind,bjnd->bnij", q, k) / np.sqrt(D)
    i, j = np.arange(T)[:, None], np.arange(T)[None]
    ok = (j <= i) & ((i - j) < (window or T + 1))
    ok = ok[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
    s = np.where(ok, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bnij,bjnd->bind", p, v)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_matches_float64_reference(window):
    cfg = f32_cfg(attn_num_kv_heads=2)
    m = Attention(cfg, window=window, rngs=nnx.Rngs(0))
    x = rand((2, 19, 64), 6)
    seg = jnp.array([[0] * 7 + [1] * 12, [3] * 19], jnp.int32)
    # RoPE positions restart per document; apply the layer's own rope to isolate the scores.
    from gdn_jax.model import positions_from_segments
    pos = positions_from_segments(seg, 2, 19)
    q, k, v = (np.asarray(a, np.float64) for a in m._qkv(x, pos))
    o = np_attention(q, k, v, np.asarray(seg), window)
    ref = o.reshape(2, 19, -1) @ np.asarray(m.o_proj.kernel[...], np.float64)
    got = nnx.jit(lambda m, x, s, p: m(x, segment_ids=s, positions=p)[0])(m, x, seg, pos)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_rope_is_relative():
    """Scores of RoPE'd q, k depend only on the position difference."""
    from gdn_jax.layers.attention import rope
    q, k = rand((1, 1, 1, 16), 7), rand((1, 1, 1, 16), 8)
    dot = lambda pq, pk: float(jnp.sum(rope(q, jnp.array([[pq]]), 1e4) * rope(k, jnp.array([[pk]]), 1e4)))
    assert abs(dot(5, 2) - dot(103, 100)) < 1e-4
    assert abs(dot(0, 0) - float(jnp.sum(q * k))) < 1e-5


def test_ssd_chunked_matches_scan_and_float64():
    B, T, H, P, N = 2, 37, 3, 4, 5
    ks = jax.random.split(jax.random.key(9), 4)
    x = jax.random.normal(ks[0], (B, T, H, P))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (B, T, H)))
    Bm, Cm = jax.random.normal(ks[2], (B, T, H, N)), jax.random.normal(ks[3], (B, T, H, N))
    A = -jnp.array([0.1, 1.0, 3.0])
    doc = jnp.array([[0] * 10 + [1] * 20 + [2] * 7, [0] * 37], jnp.int32)
    # float64 loop
    xn, dtn, Bn, Cn, An = (np.asarray(a, np.float64) for a in (x, dt, Bm, Cm, A))
    ref = np.zeros((B, T, H, P))
    final = np.zeros((B, H, P, N))
    for b in range(B):
        h = np.zeros((H, P, N))
        for t in range(T):
            if t and doc[b, t] != doc[b, t - 1]:
                h = np.zeros((H, P, N))
            h = np.exp(dtn[b, t] * An)[:, None, None] * h \
                + np.einsum("h,hp,hn->hpn", dtn[b, t], xn[b, t], Bn[b, t])
            ref[b, t] = np.einsum("hpn,hn->hp", h, Cn[b, t])
        final[b] = h
    y_s, h_s = jax.jit(ssd_scan)(x, dt, A, Bm, Cm, doc=doc)
    y_c, h_c = jax.jit(ssd_chunked, static_argnames="chunk_size")(x, dt, A, Bm, Cm, doc=doc,
                                                                   chunk_size=16)
    for y, h in ((y_s, h_s), (y_c, h_c)):
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(h, final, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", MIXERS)
def test_mixer_is_causal(kind):
    m = make(kind)
    x = rand((2, 24, 64), 10)
    t0 = 13
    x2 = x.at[:, t0 + 1:].set(rand((2, 24 - t0 - 1, 64), 11))
    y1, y2 = run(m, x), run(m, x2)
    np.testing.assert_allclose(y1[:, :t0 + 1], y2[:, :t0 + 1], rtol=1e-5, atol=1e-6)
    assert np.abs(y1[:, t0 + 1:] - y2[:, t0 + 1:]).max() > 1e-3  # later outputs do change


@pytest.mark.parametrize("kind", MIXERS)
def test_mixer_packed_documents_equal_separate_runs(kind):
    m = make(kind)
    lengths = [5, 14, 3, 10]
    T = sum(lengths)
    x = rand((1, T, 64), 12)
    seg = jnp.concatenate([jnp.full((n,), i + 7, jnp.int32) for i, n in enumerate(lengths)])[None]
    # Row 0: the packed documents. Rows 1..: each document alone, right-padded (causality keeps the
    # pads out of its outputs) with one constant segment id. One call, one compile.
    starts = np.cumsum([0] + lengths[:-1])
    alone = jnp.stack([jnp.pad(x[0, s:s + n], ((0, T - n), (0, 0))) for s, n in zip(starts, lengths)])
    y = run(m, jnp.concatenate([x, alone]),
            jnp.concatenate([seg, jnp.zeros((len(lengths), T), jnp.int32)]))
    for i, (s, n) in enumerate(zip(starts, lengths)):
        np.testing.assert_allclose(y[0, s:s + n], y[1 + i, :n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunk", "pallas"])
def test_gdn_layer_impls_agree_with_scan(impl):
    seg = jnp.array([[0] * 11 + [1] * 19, [2] * 30], jnp.int32)
    x = rand((2, 30, 64), 13)
    ref = run(make("G", gdn_impl="scan"), x, seg)
    np.testing.assert_allclose(run(make("G", gdn_impl=impl), x, seg), ref, rtol=1e-4, atol=1e-5)
