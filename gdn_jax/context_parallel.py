"""Context parallelism: every row's T tokens split over the `context` mesh axis, computed exactly.

Device p of P holds tokens [p T_l, (p + 1) T_l) of every row. Over its segment the gated delta rule
maps the entering state linearly, and so does every output:

    S_out(p) = M(p) S_in(p) + L(p)             M(p) = prod_t a_t (I - beta_t k_t k_t^T)   [K, K]
    o_t      = o0_t + S_in(p)^T (M_t^T q'_t)    M_t = the same product up to token t, q' = scale q

L(p) and o0 are the op's final state and outputs from a zero state; M(p) and M_t^T q'_t are its final
state and outputs from initial_state = I [B, HV, K, K] over values v = 0 [B, T_l, HV, K] (the state
is then M_t itself). So each device runs the public op twice over its own tokens, side by side with
the others; all-gathers (M, L), which are small ([P, B, HV, K, K + V], independent of T); scans them in
order from the row's initial state to get its S_in(p); and corrects its outputs. A reset inside a
segment zeroes M_t from there on, so packed documents that cross a device boundary need nothing
more, except where a document starts exactly at a device's first token (the op never resets at
t = 0): there the entering state is zero, so that device's M counts as 0.

The backward is autodiff: the op's VJP (custom for the Pallas kernels), the all-gather's transpose
(a reduce-scatter) and the scan's reverse. The same split, inside one device, is
kernels_pallas/context_parallel.py.

Layers call `context_size()` (the `context` axis of the mesh set with `jax.set_mesh`, 1 without one)
and run their sequence mixing per device inside `over_context(fn)`; `from_previous` passes the short
convolution's and sliding-window attention's halo from device p - 1 to device p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gdn_jax.ops import gated_delta_rule

CONTEXT_AXIS = "context"
_HIGHEST = jax.lax.Precision.HIGHEST


def context_size() -> int:
    """Devices on the `context` axis of the current mesh (`jax.set_mesh`); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return dict(mesh.shape).get(CONTEXT_AXIS, 1)


def _per_device() -> bool:
    """True inside a shard_map that is manual over the context axis (the train step's)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and CONTEXT_AXIS in getattr(mesh, "manual_axes", ())


def _shard_map(fn, in_specs, out_specs):
    # check_vma=False: the Pallas kernels' output shapes carry no varying-axis types, which the
    # check requires. Gradients of replicated inputs (closed-over parameters, initial states) and
    # of the replicated final state are exact all the same (tests/test_context_parallel.py).
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, axis_names={CONTEXT_AXIS},
                         check_vma=False)


def over_context(fn):
    """`fn` run per device on its share of T: every argument and result is [B, T, ...] (or None),
    split over the context axis along dim 1; the other mesh axes stay automatic. Inside a
    shard_map already manual over the axis (the train step), arrays are per device already: fn."""
    if _per_device():
        return fn
    spec = P(None, CONTEXT_AXIS)
    return _shard_map(fn, spec, spec)


def continue_positions(positions_BxT, segment_ids_BxT):
    """Per-document positions [B, T_l] that restart at each device's first token -> the row's
    positions, for code that runs per device over the context axis (a document that continues
    from device p - 1 continues its count). Unchanged outside such code."""
    if not _per_device() or context_size() == 1:
        return positions_BxT
    B, T_l = positions_BxT.shape
    seg = jnp.zeros((B, T_l), jnp.int32) if segment_ids_BxT is None else segment_ids_BxT
    p = jax.lax.axis_index(CONTEXT_AXIS)
    continues_B = (p > 0) & (seg[:, 0] == from_previous(seg, 1)[:, 0])
    changed = jnp.concatenate([jnp.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    first_doc = jnp.cumsum(changed, axis=1) == 0
    one_doc_B = first_doc[:, -1]  # then the count reaching the last token began before us
    last_B = positions_BxT[:, -1]
    c, u, last = (jax.lax.all_gather(x, CONTEXT_AXIS) for x in (continues_B, one_doc_B, last_B))

    def offset(off_prev, x):  # position of device q's first token, from device q - 1's state
        c_q, u_prev, last_prev = x
        off = jnp.where(c_q, last_prev + 1 + jnp.where(u_prev, off_prev, 0), 0)
        return off, off

    # Device q's first offset depends on device q - 1's values: shift them by one.
    shifted = lambda x: jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]])
    _, offsets = jax.lax.scan(offset, jnp.zeros((B,), positions_BxT.dtype),
                              (c, shifted(u), shifted(last)))
    return positions_BxT + jnp.where(first_doc, offsets[p][:, None], 0)


def from_previous(x_BxTx, n: int, axis_name: str = CONTEXT_AXIS):
    """Inside over_context: the last n tokens [B, n, ...] of device p - 1's segment (zeros on
    device 0). Needs n <= T_l: a halo only ever reaches back one device."""
    T_l = x_BxTx.shape[1]
    if n > T_l:
        raise ValueError(f"a halo of {n} tokens reaches past the previous device's {T_l} tokens; "
                         "use fewer context devices or a longer sequence")
    P_ = jax.lax.axis_size(axis_name)
    return jax.lax.ppermute(x_BxTx[:, T_l - n:], axis_name, [(i, i + 1) for i in range(P_ - 1)])


def gated_delta_rule_segment(q, k, v, g, beta, *, axis_name: str = CONTEXT_AXIS, scale=None,
                             initial_state=None, output_final_state=False, segment_ids=None,
                             chunk_size=64, impl="auto"):
    """The gated delta rule over a sequence split along `axis_name`, called per device (inside
    shard_map) on its segment: q, k [B, T_l, H, K]; v [B, T_l, HV, V]; g, beta [B, T_l, HV];
    segment_ids [B, T_l] (this device's part of the row's ids); initial_state [B, HV, K, V] float32,
    the same on every device (the state before the row's first token). T_l may be any length.

    Returns (o [B, T_l, HV, V] in v's dtype, final state [B, HV, K, V] float32 after the row's last
    token, the same on every device, or None). See the module docstring for the math.
    """
    B, T_l, H, K = q.shape
    HV, V = v.shape[2:]
    f32 = jnp.float32
    op = dict(scale=scale, output_final_state=True, segment_ids=segment_ids, chunk_size=chunk_size,
              impl=impl)
    eye = jnp.broadcast_to(jnp.eye(K, dtype=f32), (B, HV, K, K))
    zero = jnp.zeros((B, HV, K, V), f32)
    Mq, M = gated_delta_rule(q, k, jnp.zeros((B, T_l, HV, K), v.dtype), g, beta,
                             initial_state=eye, **op)
    o0, L = gated_delta_rule(q, k, v, g, beta, initial_state=zero, **op)

    p = jax.lax.axis_index(axis_name)
    if segment_ids is None:
        keep_B = jnp.ones((B,), f32)
    else:
        # A document starting at this device's first token enters from zero (device 0 keeps the
        # user's initial state, which belongs to the row's first document).
        prev_last = from_previous(segment_ids, 1, axis_name)[:, 0]
        keep_B = ((p == 0) | (segment_ids[:, 0] == prev_last)).astype(f32)
    M = M * keep_B[:, None, None, None]

    M_P, L_P = jax.lax.all_gather(M, axis_name), jax.lax.all_gather(L, axis_name)

    def carry(S, ml):
        M_p, L_p = ml
        return jnp.einsum("bhij,bhjv->bhiv", M_p, S, precision=_HIGHEST) + L_p, S

    S0 = zero if initial_state is None else initial_state.astype(f32)
    S_final, S_enter = jax.lax.scan(carry, S0, (M_P, L_P))
    S_in = S_enter[p] * keep_B[:, None, None, None]
    correction = jnp.einsum("bthk,bhkv->bthv", Mq.astype(f32), S_in, precision=_HIGHEST)
    o = (o0.astype(f32) + correction).astype(v.dtype)
    # Every device ran the same scan over the same gathered (M, L): S_final is replicated.
    return o, (S_final if output_final_state else None)


def gated_delta_rule_context_parallel(q, k, v, g, beta, *, scale=None, initial_state=None,
                                      output_final_state=False, segment_ids=None, chunk_size=64,
                                      impl="auto"):
    """`gdn_jax.ops.gated_delta_rule` with T split over the context axis of the current mesh
    (`jax.set_mesh`): the same arguments and results, global arrays in and out; T a multiple of the
    axis size. The final state is replicated over the axis."""
    t = P(None, CONTEXT_AXIS)

    def body(q, k, v, g, beta, initial_state, segment_ids):
        return gated_delta_rule_segment(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
            output_final_state=output_final_state, chunk_size=chunk_size, impl=impl)

    run = _shard_map(body, (t, t, t, t, t, P(), t), (t, P()))
    return run(q, k, v, g, beta, initial_state, segment_ids)
