"""The Pallas short conv (kernels_pallas/short_conv.py) against a float64 NumPy oracle written from the
equation, and against ShortConv's jax.numpy path, forward and gradients with random cotangents, with
packed documents that cross tiles and batch rows, ragged row counts and narrow channel tiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax.layers.conv import ShortConv
from kernels_pallas import short_conv as sc


def conv_oracle(x, w, seg, dy):
    """float64, per batch row b and token t, tap i reading token t - (W - 1 - i) of the same row and
    document: y = silu(pre), and (dx, dw) for the cotangent dy."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    B, T, C = x.shape
    W = w.shape[0]
    pre = np.zeros((B, T, C))
    for b in range(B):
        for t in range(T):
            for i in range(W):
                u = t - (W - 1 - i)
                if u >= 0 and seg[b, u] == seg[b, t] and all(seg[b, u:t + 1] == seg[b, t]):
                    pre[b, t] += w[i] * x[b, u]
    sig = 1.0 / (1.0 + np.exp(-pre))
    dpre = dy * sig * (1.0 + pre * (1.0 - sig))
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for b in range(B):
        for t in range(T):
            for i in range(W):
                u = t - (W - 1 - i)
                if u >= 0 and all(seg[b, u:t + 1] == seg[b, t]):
                    dx[b, u] += w[i] * dpre[b, t]
                    dw[i] += x[b, u] * dpre[b, t]
    return pre * sig, dx, dw


def packed_segments(B, T, seed):
    """Segment ids with documents of random lengths (some shorter than the conv), per row."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=min(6, T - 1), replace=False))
        for n, c in enumerate(cuts):
            seg[b, c:] = n + 1
    return seg


def conv_module(C, W, impl, seed=0):
    conv = ShortConv(C, W, std=0.5, impl=impl, rngs=nnx.Rngs(seed))
    return conv


def run(conv, x, seg, dy):
    """(y, dx, dw) of the module for the cotangent dy."""
    graph, params = nnx.split(conv)

    def f(x_, p_):
        return nnx.merge(graph, p_)(x_, segment_ids=None if seg is None else jnp.asarray(seg))[0]

    y, vjp = jax.vjp(f, x, params)
    dx, dp = vjp(dy)
    return y, dx, dp["weight"][...]


@pytest.mark.parametrize("B,T,C,W,packed", [
    (2, 75, 48, 4, True),    # ragged rows (150, not a multiple of 64), 16-channel tiles, packed
    (1, 200, 32, 4, False),  # one row, no segment ids
    (3, 40, 64, 2, True),    # two taps; rows shorter than a tile, so tiles cross batch rows
])
def test_pallas_short_conv_matches_the_float64_oracle(B, T, C, W, packed):
    k1, k2 = jax.random.split(jax.random.PRNGKey(B * T + C))
    x = jax.random.normal(k1, (B, T, C), jnp.float32)
    dy = jax.random.normal(k2, (B, T, C), jnp.float32)
    seg = packed_segments(B, T, seed=T) if packed else None
    conv = conv_module(C, W, "pallas")
    y, dx, dw = run(conv, x, seg, dy)
    want_y, want_dx, want_dw = conv_oracle(x, conv.weight[...], np.zeros((B, T), np.int32)
                                           if seg is None else seg, dy)
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5,
                                   atol=2e-5 * np.abs(want).max())


def test_pallas_short_conv_matches_the_jax_numpy_path_in_bf16():
    """bf16 activations, float32 weights: the kernel against ShortConv's own jax.numpy path on the
    same weights (both accumulate in float32; outputs and input gradients are bf16)."""
    B, T, C, W = 2, 96, 256, 4
    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    x = jax.random.normal(k1, (B, T, C), jnp.bfloat16)
    dy = jax.random.normal(k2, (B, T, C), jnp.bfloat16)
    seg = packed_segments(B, T, seed=3)
    got = run(conv_module(C, W, "pallas"), x, seg, dy)
    want = run(conv_module(C, W, "xla"), x, seg, dy)
    assert got[0].dtype == got[1].dtype == jnp.bfloat16 and got[2].dtype == jnp.float32
    for g, w_, tol in zip(got, want, (1e-2, 1e-2, 1e-4)):
        g, w_ = np.asarray(g, np.float32), np.asarray(w_, np.float32)
        assert np.max(np.abs(g - w_)) <= tol * np.abs(w_).max(), (np.max(np.abs(g - w_)), tol)


def jaxpr_has_pallas_call(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_the_kernel_runs_only_where_it_applies():
    """impl="pallas" runs the kernel on the plain forward; a decode cache, a returned cache, a bias,
    too few rows and the "xla"/"auto" impls take the jax.numpy path."""
    x = jnp.zeros((2, 64, 32), jnp.float32)
    pallas, xla = conv_module(32, 4, "pallas"), conv_module(32, 4, "auto")
    assert jaxpr_has_pallas_call(lambda a: pallas(a)[0], x)
    assert not jaxpr_has_pallas_call(lambda a: xla(a)[0], x)
    assert not jaxpr_has_pallas_call(lambda a: pallas(a, return_cache=True)[0], x)
    assert not jaxpr_has_pallas_call(lambda a: pallas(a, cache=a[:, :3])[0], x)
    assert not jaxpr_has_pallas_call(lambda a: pallas(a)[0], x[:1, :40])  # 40 rows < 64 + 6
    biased = ShortConv(32, 4, std=0.5, use_bias=True, impl="pallas", rngs=nnx.Rngs(0))
    assert not jaxpr_has_pallas_call(lambda a: biased(a)[0], x)


def test_bad_conv_impl_is_named():
    with pytest.raises(ValueError, match="conv_impl"):
        ShortConv(32, 4, std=0.5, impl="cuda", rngs=nnx.Rngs(0))
    from configs.model import ModelConfig
    with pytest.raises(ValueError, match="conv_impl"):
        ModelConfig(conv_impl="triton")


def test_the_gdn_lm_trains_the_same_with_either_conv():
    """The tiny GDN LM's loss and every parameter gradient, conv_impl "pallas" against "xla"
    (float32, packed documents)."""
    from configs.model import get_model_config
    from gdn_jax.model import LM

    B, T = 2, 80
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, 256)
    seg = jnp.asarray(packed_segments(B, T, seed=5))

    def loss_and_grads(impl):
        model = LM(get_model_config("tiny", dtype="float32", gdn_impl="chunk", conv_impl=impl,
                                    num_layers=1), rngs=nnx.Rngs(0))
        graph, params = nnx.split(model)
        assert jaxpr_has_pallas_call(lambda p: nnx.merge(graph, p)(tokens, segment_ids=seg),
                                     params) == (impl == "pallas")

        def loss(p):
            logits = nnx.merge(graph, p)(tokens, segment_ids=seg)
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

        return jax.jit(jax.value_and_grad(loss))(params)

    (l_p, g_p), (l_x, g_x) = loss_and_grads("pallas"), loss_and_grads("xla")
    np.testing.assert_allclose(float(l_p), float(l_x), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-5 * max(float(jnp.abs(b).max()), 1e-12))


@pytest.mark.parametrize("C", [1536, 3072, 48])
def test_short_conv_kernels_lower_to_triton_for_a_gpu(triton_lowers_as_for_h100, C):
    """Forward and backward lower to Triton for a GPU on this CPU at fla_gdn_1.3b's conv widths
    (q, k: 1,536; v: 3,072) and a narrow one (16-channel tiles)."""
    N, W = 4 * 4096 if C > 48 else 300, 4
    x = jnp.zeros((N, C), jnp.bfloat16)
    w = jnp.zeros((W, C), jnp.float32)
    doc = jnp.zeros((N,), jnp.int32)
    fwd = jax.jit(lambda x, w: sc.short_conv_silu(x, w, doc, False))
    bwd = jax.jit(lambda x, w, dy: jax.vjp(lambda a, b: sc.short_conv_silu(a, b, doc, False),
                                           x, w)[1](dy))
    text = fwd.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "short_conv_silu" in text
    text = bwd.trace(x, w, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "short_conv_silu_bwd" in text


def test_bench_short_conv_checks_and_times_both_paths(capsys):
    """bench/bench_short_conv.py on a CPU-sized shape: both paths checked against "xla" and timed."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    import bench_short_conv

    assert bench_short_conv.main(["--rows", "2x64", "--channels", "32", "--iters", "1"]) == 0
    rows = {line.split()[1]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split()[:1] == ["32"]}
    assert set(rows) == {"xla", "pallas"}
    assert all(float(e) < 2e-2 for e in rows["pallas"][2:5])  # bf16: about one ulp at most
