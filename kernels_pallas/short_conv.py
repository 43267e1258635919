"""The short causal depthwise convolution with SiLU, forward and backward, as Pallas (Triton) kernels.

Over the flattened rows n of x [N, C] (N = B * T; doc [N] int32 says which document each row
belongs to, different across batch rows), with W taps w [W, C] (float32):
    pre[n] = sum_{i<W} [doc[n - s] = doc[n]] w[i] x[n - s],   s = W - 1 - i   (float32)
    y[n]   = silu(pre[n])                                                      (x's dtype)
Backward, with dpre[n] = dy[n] silu'(pre[n]) and silu'(z) = sig(z) (1 + z (1 - sig(z))):
    dx[n]  = sum_{s<W} [doc[n] = doc[n + s]] w[W-1-s] dpre[n + s]
    dw[i]  = sum_n [doc[n - s] = doc[n]] x[n - s] dpre[n]

Why kernels: XLA fuses the backward's input gradient into the column reduction that forms dw, and
that fusion ran at ~10x its bytes on an H200 (439 us for one 16,384 x 1,536 conv of fla_gdn_1.3b,
docs/benchmarks.md). Here a program owns a tile of BT rows by BC channels, reads each input once
(its W - 1 neighbours come from shifted loads that the cache serves), writes dx and its tile's
partial dw [W, BC]; the partials [tiles, W, C] are summed after.

Every load is in bounds (Pallas's interpret mode cannot load a tile that starts before row 0): the
tiles start at clip(k BT, W - 1, N - BT) forward and clip(k BT, W - 1, N - BT - (W - 1)) backward,
so a tile that would reach past either end is moved in and overlaps its neighbour (which writes the
same values; only rows in [k BT, (k + 1) BT) count towards tile k's dw). The first W - 1 rows
(forward) and the first and last W - 1 rows (backward) are done by `reference` on small slabs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import backend

BLOCK_ROWS = 64


def reference(x_NxC, w_WxC, doc_N):
    """pre and y = silu(pre) of the docstring in plain JAX (the slabs' path, and the tests' oracle)."""
    W = w_WxC.shape[0]
    N = x_NxC.shape[0]
    pre = jnp.zeros(x_NxC.shape, jnp.float32)
    for i in range(W):
        s = W - 1 - i
        src = jnp.pad(x_NxC[:N - s].astype(jnp.float32), ((s, 0), (0, 0)))
        if s:
            same = jnp.pad(doc_N[:N - s], (s, 0), constant_values=-1) == doc_N
            src = jnp.where(same[:, None], src, 0.0)
        pre = pre + src * w_WxC[i]
    return jax.nn.silu(pre).astype(x_NxC.dtype)


def block_channels(C: int) -> int | None:
    """The largest power of two up to 64 dividing C, or None below 16 (the kernels then do not run).
    64, not more: a [64, 64] float32 tile is 32 registers a thread at the forward's 4 warps (16 at
    the backward's 8, which holds about five: dx, pre, its sigmoid, dpre, a tap); [64, 128] tiles
    would spill. A first choice, not yet tuned on a GPU."""
    bc = 64
    while bc >= 16 and C % bc:
        bc //= 2
    return bc if bc >= 16 else None


def unsupported_reason(N: int, C: int, W: int) -> str | None:
    """Why the kernels cannot run on x [N, C] with W taps, or None."""
    if block_channels(C) is None:
        return f"the channel count {C} has no power-of-two divisor >= 16"
    if W < 2:
        return f"kernel_size {W} < 2"
    if N < BLOCK_ROWS + 2 * (W - 1):
        return f"B * T = {N} rows < {BLOCK_ROWS + 2 * (W - 1)}"
    return None


def _sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))  # exp(-z) = inf for very negative z gives 0, never NaN


def _tap(x_ref, doc_ref, d, rows0, cols, s):
    """x at rows [rows0 - s, rows0 - s + BT) of the tile's columns (float32), zero where the row is
    in another document than the output row it feeds (doc d)."""
    src = x_ref[pl.ds(rows0 - s, BLOCK_ROWS), cols].astype(jnp.float32)
    if s:
        src = jnp.where((doc_ref[pl.ds(rows0 - s, BLOCK_ROWS)] == d)[:, None], src, 0.0)
    return src


def _pre(x_ref, w_ref, doc_ref, rows0, cols, W):
    """pre for rows [rows0, rows0 + BT) of the tile's columns, and those rows' doc ids."""
    d = doc_ref[pl.ds(rows0, BLOCK_ROWS)]
    pre = None
    for i in range(W):
        term = _tap(x_ref, doc_ref, d, rows0, cols, W - 1 - i) * w_ref[i, cols][None, :]
        pre = term if pre is None else pre + term
    return pre, d


def _forward_kernel(x_ref, w_ref, doc_ref, y_ref, *, N, W, BC):
    k, j = pl.program_id(0), pl.program_id(1)
    t0 = jnp.clip(k * BLOCK_ROWS, W - 1, N - BLOCK_ROWS)
    cols = pl.ds(j * BC, BC)
    pre, _ = _pre(x_ref, w_ref, doc_ref, t0, cols, W)
    y_ref[pl.ds(t0, BLOCK_ROWS), cols] = (pre * _sigmoid(pre)).astype(y_ref.dtype)


def _backward_kernel(x_ref, w_ref, doc_ref, dy_ref, dx_ref, dw_ref, *, N, W, BC):
    k, j = pl.program_id(0), pl.program_id(1)
    t0 = jnp.clip(k * BLOCK_ROWS, W - 1, N - BLOCK_ROWS - (W - 1))
    cols = pl.ds(j * BC, BC)
    rows = t0 + jax.lax.broadcasted_iota(jnp.int32, (BLOCK_ROWS,), 0)
    own = ((rows >= k * BLOCK_ROWS) & (rows < (k + 1) * BLOCK_ROWS))[:, None]
    dx = None
    for s in range(W):  # the outputs at rows + s, which read row `rows` through tap W - 1 - s
        pre, d_out = _pre(x_ref, w_ref, doc_ref, t0 + s, cols, W)
        sig = _sigmoid(pre)
        dpre = dy_ref[pl.ds(t0 + s, BLOCK_ROWS), cols].astype(jnp.float32) * (
            sig * (1.0 + pre * (1.0 - sig)))
        term = dpre * w_ref[W - 1 - s, cols][None, :]
        if s:
            term = jnp.where((doc_ref[pl.ds(t0, BLOCK_ROWS)] == d_out)[:, None], term, 0.0)
        dx = term if dx is None else dx + term
        if s == 0:  # this tile's own outputs: their share of every tap's weight gradient (the
            # taps loaded again, from the cache, rather than held in registers since `pre`)
            owned = jnp.where(own, dpre, 0.0)
            for i in range(W):
                tap = _tap(x_ref, doc_ref, d_out, t0, cols, W - 1 - i)
                dw_ref[k, i, cols] = jnp.sum(tap * owned, axis=0)
    dx_ref[pl.ds(t0, BLOCK_ROWS), cols] = dx.astype(dx_ref.dtype)


def _grid(N, C):
    return (pl.cdiv(N, BLOCK_ROWS), C // block_channels(C))


def _check(x, w, doc):
    N, C = x.shape
    reason = unsupported_reason(N, C, w.shape[0])
    if reason is not None:
        raise ValueError(f"pallas short conv cannot run x {x.shape}: {reason}")
    if doc.shape != (N,):
        raise ValueError(f"doc must be [{N}] (one document id per row of x), got {doc.shape}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def short_conv_silu(x_NxC, w_WxC, doc_N, interpret=None):
    """y [N, C] (x's dtype) of the module docstring; differentiable in x and w."""
    return _forward(x_NxC, w_WxC, doc_N, interpret)


def _interpret(interpret):
    return (not backend.on_gpu()) if interpret is None else interpret


def _forward(x, w, doc, interpret):
    _check(x, w, doc)
    N, C = x.shape
    W = w.shape[0]
    w = w.astype(jnp.float32)
    whole = backend.WHOLE
    y = backend.call(
        functools.partial(_forward_kernel, N=N, W=W, BC=block_channels(C)),
        grid=_grid(N, C), in_specs=[whole] * 3, out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((N, C), x.dtype), num_warps=4, num_stages=1,
        interpret=_interpret(interpret), name="short_conv_silu")(x, w, doc)
    head = reference(x[:W - 1], w, doc[:W - 1])  # rows before any tile's reach: no earlier rows
    return y.at[:W - 1].set(head)


def _fwd(x, w, doc, interpret):
    return _forward(x, w, doc, interpret), (x, w, doc)


def _slab_grads(x, w, doc, dy):
    """(dx, dw) of `reference` on a small slab of rows, treated as a sequence of its own."""
    _, vjp = jax.vjp(lambda x_, w_: reference(x_, w_, doc), x, w)
    return vjp(dy)


def _bwd(interpret, res, dy):
    x, w, doc = res
    N, C = x.shape
    W = w.shape[0]
    whole = backend.WHOLE
    tiles = _grid(N, C)[0]
    dx, dw_parts = backend.call(
        functools.partial(_backward_kernel, N=N, W=W, BC=block_channels(C)),
        grid=_grid(N, C), in_specs=[whole] * 4, out_specs=[whole, whole],
        out_shape=[jax.ShapeDtypeStruct((N, C), x.dtype),
                   jax.ShapeDtypeStruct((tiles, W, C), jnp.float32)], num_warps=8, num_stages=1,
        interpret=_interpret(interpret), name="short_conv_silu_bwd")(x, w.astype(jnp.float32), doc, dy)
    dw = jnp.sum(dw_parts, axis=0)
    # The first W - 1 rows: their input gradients take every output up to row 2W - 3 (a slab of
    # 2(W - 1) rows, which starts where the sequence does); their outputs' dw share apart.
    L = 2 * (W - 1)
    head = slice(0, L)
    dx_head, _ = _slab_grads(x[head], w, doc[head], dy[head])
    _, dw_head = _slab_grads(x[head], w, doc[head], dy[head].at[W - 1:].set(0))
    # The last W - 1 rows: only outputs at or after them read them, and those outputs need the
    # W - 1 rows before them (the slab's first half, whose own outputs are not wanted).
    tail = slice(N - L, N)
    dx_tail, dw_tail = _slab_grads(x[tail], w, doc[tail], dy[tail].at[:W - 1].set(0))
    dx = dx.at[:W - 1].set(dx_head[:W - 1]).at[N - (W - 1):].set(dx_tail[W - 1:])
    return dx, (dw + dw_head + dw_tail).astype(w.dtype), None


short_conv_silu.defvjp(_fwd, _bwd)
