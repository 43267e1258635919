"""Intra-device context parallelism: P sequence segments swept side by side, joined exactly.

The sweeps are sequential over chunks, so with few (batch, head, value tile) programs most SMs sit
idle. Split each row's N chunks into P segments and treat them as P rows. A segment maps the state
entering it linearly:

    S_out(p) = M(p) S_in(p) + L(p),     M(p) = prod over its tokens of a_t (I - beta_t k_t k_t^T)  [K, K]

Both come from one sweep per segment, started from [I | 0] over the values [0 | v] (the state's
columns are independent, so K extra columns carry M while the V real ones carry L). A scan over the
P segments then gives each segment's true entering state, and a second, ordinary sweep from those
states gives the outputs. The backward is the adjoint: dS_in(p) = M(p)^T dS_out(p) + dL(p), with
dL(p) from a reverse sweep of the segment started at zero.

Arrays are chunk-major ([B, N, ...]), so the split [B, N] -> [B*P, N/P] and the merge are reshapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.layout import Tiling

_HIGHEST = jax.lax.Precision.HIGHEST


def segment_tiling(t: Tiling) -> Tiling:
    """The tiling of the segments seen as rows: B*P rows of N/P chunks."""
    return t._replace(B=t.B * t.segments, N=t.N // t.segments, segments=1)


def split(x, P):
    """[B, N, ...] -> [B*P, N/P, ...]."""
    return x.reshape(x.shape[0] * P, x.shape[1] // P, *x.shape[2:])


def merge(x, P):
    """[B*P, N/P, ...] -> [B, N, ...]."""
    return x.reshape(x.shape[0] // P, x.shape[1] * P, *x.shape[2:])


def with_transition_columns(values, K):
    """Values [B*P, N/P, C, HV, V] -> [0 | values] with K leading zero columns."""
    zeros = jnp.zeros((*values.shape[:-1], K), values.dtype)
    return jnp.concatenate([zeros, values], axis=-1)


def transition_start(t: Tiling):
    """The state [I | 0] [B*P, HV, K, K+V] every segment starts from in the first pass."""
    eye = jnp.broadcast_to(jnp.eye(t.K, dtype=jnp.float32), (t.B * t.segments, t.HV, t.K, t.K))
    return jnp.concatenate([eye, jnp.zeros((*eye.shape[:-1], t.V), jnp.float32)], axis=-1)


def join_forward(S_aug, initial_state, t: Tiling):
    """From the first pass's final states [B*P, HV, K, K+V], the segments' transitions M
    [B, P, HV, K, K], their entering states [B, P, HV, K, V] and the row's final state."""
    P, K = t.segments, t.K
    S_aug = S_aug.reshape(t.B, P, t.HV, K, K + t.V)
    M, L = S_aug[..., :K], S_aug[..., K:]

    def step(S, ml):
        M_p, L_p = ml
        return jnp.einsum("bhij,bhjv->bhiv", M_p, S, precision=_HIGHEST) + L_p, S

    S_final, S_in = jax.lax.scan(step, initial_state, (jnp.moveaxis(M, 1, 0), jnp.moveaxis(L, 1, 0)))
    return M, jnp.moveaxis(S_in, 0, 1), S_final


def join_backward(dL, M, dS_final, t: Tiling):
    """Cotangents of the states leaving each segment [B, P, HV, K, V], from each segment's own part
    dL [B*P, HV, K, V] (its reverse sweep from zero) and the transitions M."""
    P = t.segments
    dL = dL.reshape(t.B, P, t.HV, t.K, t.V)

    def step(dS_out, md):  # dS_out leaves segment p; returns what leaves segment p - 1
        M_p, dL_p = md
        dS_prev = jnp.einsum("bhji,bhjv->bhiv", M_p, dS_out, precision=_HIGHEST) + dL_p
        return dS_prev, dS_prev

    later = lambda x: jnp.moveaxis(x[:, 1:], 1, 0)[::-1]  # segments P-1 .. 1
    _, earlier = jax.lax.scan(step, dS_final, (later(M), later(dL)))
    leaving = jnp.concatenate([dS_final[None], earlier])  # entry i leaves segment P-1-i
    return jnp.moveaxis(leaving[::-1], 0, 1)
