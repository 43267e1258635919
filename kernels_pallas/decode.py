"""One decoding token of the gated delta rule as one Pallas (Triton) kernel: the state read once,
updated in place and written once, with the output formed from the same read.

With a = exp(g), q' = scale q and, from the old state, kS = S^T k and qS = S^T q':
    S' = a (S - beta k kS^T) + beta k v^T                 [K, V] per (row, value head)
    o  = S'^T q' = a (qS - beta (k.q') kS) + beta (k.q') v
(the same arithmetic as `gdn_jax.ops.xla_decode_recurrence`, which XLA runs as a reduction over the
state followed by an elementwise update: two passes, launched as separate kernels, and at batch 1
with little parallelism in either).

Grid (B * HV, V / BV): a program owns one value tile of one row's value head, reads its [K, BV]
float32 state tile once, and writes the new tile over it (the state is aliased to the output), so
each state byte moves once each way. K need not be a power of two (the paper's 200): the state tile
and q, k are loaded Kp = next power of two rows high, masked beyond K.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels_pallas import backend


def _block_v(V: int) -> int:
    """The largest power of two up to 32 that divides V (value tiles never straddle V). 32, not
    more: at batch 1 the grid is HV * V / BV programs (96 for fla_gdn_1.3b's 6 heads of 512), and
    fewer would leave most of an H100's 132 SMs idle; a [256, 32] float32 tile is 64 registers a
    thread at 4 warps."""
    bv = 1
    while bv < 32 and V % (2 * bv) == 0:
        bv *= 2
    return bv


def pallas_decode_recurrence(q_t, k_t, v_t, g_t, beta_t, state, *, scale, block_v=None,
                             num_warps=4, interpret=None):
    """q_t, k_t [B, H, K]; v_t [B, HV, V]; g_t, beta_t [B, HV]; state [B, HV, K, V] float32 (HV a
    multiple of H: value head hv reads key head hv // (HV / H)). Returns (o_t [B, HV, V] in v_t's
    dtype, new state [B, HV, K, V] float32, written over `state`'s buffer where XLA can donate it).
    block_v: the value tile (default: the largest power of two up to 32 dividing V)."""
    B, H, K = q_t.shape
    HV, V = v_t.shape[1:]
    group = HV // H
    BV = _block_v(V) if block_v is None else block_v
    if V % BV:
        raise ValueError(f"block_v must divide V = {V}, got {BV}")
    Kp = pl.next_power_of_2(K)
    interpret = (not backend.on_gpu()) if interpret is None else interpret

    def kernel(q_ref, k_ref, v_ref, g_ref, b_ref, s_ref, o_ref, s_out_ref):
        bhv, j = pl.program_id(0), pl.program_id(1)
        b, hv = bhv // HV, bhv % HV
        h = hv // group
        zero = bhv * 0  # a traced 0: masked loads may reach past K, and Pallas checks static bounds
        rows = jax.lax.broadcasted_iota(jnp.int32, (Kp,), 0) < K
        cols = pl.ds(j * BV, BV)
        f32 = jnp.float32
        q = pl_triton.load(q_ref.at[b, h, pl.ds(zero, Kp)], mask=rows, other=0).astype(f32) * scale
        k = pl_triton.load(k_ref.at[b, h, pl.ds(zero, Kp)], mask=rows, other=0).astype(f32)
        v = v_ref[b, hv, cols].astype(f32)
        a = jnp.exp(g_ref[b, hv].astype(f32))
        beta = b_ref[b, hv].astype(f32)
        tile = s_ref.at[b, hv, pl.ds(zero, Kp), cols]
        mask = jnp.broadcast_to(rows[:, None], (Kp, BV))
        S = pl_triton.load(tile, mask=mask, other=0)
        kS = jnp.sum(k[:, None] * S, axis=0)  # [BV]
        qS = jnp.sum(q[:, None] * S, axis=0)
        bk = beta * k
        S_new = a * (S - bk[:, None] * kS[None, :]) + bk[:, None] * v[None, :]
        bkq = jnp.sum(bk * q)
        o_ref[b, hv, cols] = (a * (qS - bkq * kS) + bkq * v).astype(o_ref.dtype)
        pl_triton.store(s_out_ref.at[b, hv, pl.ds(zero, Kp), cols], S_new, mask=mask)

    whole = backend.WHOLE
    return pl.pallas_call(
        kernel, grid=(B * HV, V // BV), in_specs=[whole] * 6, out_specs=[whole, whole],
        out_shape=[jax.ShapeDtypeStruct((B, HV, V), v_t.dtype),
                   jax.ShapeDtypeStruct(state.shape, jnp.float32)],
        input_output_aliases={5: 1},
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="gdn_decode_step",
    )(q_t, k_t, v_t, g_t, beta_t, state.astype(jnp.float32))
