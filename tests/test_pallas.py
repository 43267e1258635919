"""impl="pallas" (the Pallas kernels, in interpret mode on a CPU) against the float64 oracle and scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.ops import gated_delta_rule, resets_from_segment_ids
from kernels_pallas import pallas_gated_delta_rule
from op_inputs import random_op_inputs
from oracle import gated_delta_rule_oracle
from test_ops import OP_ARGS, loss_with_random_cotangents, rel_err, run_op


def boundaries_at(B, T, cuts):
    """segment_ids with a new document starting at each position in cuts."""
    return np.broadcast_to((np.arange(T)[:, None] >= np.asarray(cuts)[None, :]).sum(-1), (B, T)).astype(np.int32)


CASES = {
    # name: (input options, chunk size)
    "ragged_T_gva": (dict(T=45, H=1, HV=2, K=16, V=16), 16),
    "non_pow2_heads_state": (dict(T=40, K=20, V=40, with_state=True), 32),
    "docs_c64": (dict(T=70, K=16, V=16, num_docs=4, with_state=True), 64),
    "T1": (dict(T=1, K=16, V=16, with_state=True), 16),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_oracle(case):
    opts, C = CASES[case]
    x = random_op_inputs(10, **opts)
    o, S = run_op(x, impl="pallas", chunk_size=C)
    o_ref, S_ref = gated_delta_rule_oracle(**x)
    assert rel_err(o, o_ref) < 2e-5
    assert rel_err(S, S_ref) < 2e-5


@pytest.mark.parametrize("split_output", [False, True])
def test_forward_fused_and_split_output_agree_with_oracle(split_output):
    x = random_op_inputs(18, B=2, T=64, H=1, HV=2, K=20, V=40, with_state=True, num_docs=3)
    reset = resets_from_segment_ids(jnp.asarray(x["segment_ids"]))
    o, S = pallas_gated_delta_rule(*(jnp.asarray(x[n]) for n in OP_ARGS), scale=20 ** -0.5,
                                   initial_state=jnp.asarray(x["initial_state"]), reset=reset,
                                   chunk_size=16, block_v=16, split_output=split_output)
    o_ref, S_ref = gated_delta_rule_oracle(**x)
    assert rel_err(o, o_ref) < 2e-5
    assert rel_err(S, S_ref) < 2e-5


def test_documents_starting_at_and_inside_chunk_boundaries():
    x = random_op_inputs(11, B=2, T=48, K=16, V=16, with_state=True)
    x["segment_ids"] = boundaries_at(2, 48, [16, 21, 22, 32])  # chunk starts 16, 32; 21, 22 inside
    o, S = run_op(x, impl="pallas", chunk_size=16)
    o_ref, S_ref = gated_delta_rule_oracle(**x)
    assert rel_err(o, o_ref) < 2e-5
    assert rel_err(S, S_ref) < 2e-5


@pytest.mark.parametrize("edge", [dict(g_value=0.0, beta_value=1.0), dict(g_value=-30.0)])
def test_edge_gates(edge):
    x = random_op_inputs(12, T=40, K=16, V=16, with_state=True, num_docs=2, **edge)
    o, S = run_op(x, impl="pallas", chunk_size=16)
    o_ref, S_ref = gated_delta_rule_oracle(**x)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(S)).all()
    assert rel_err(o, o_ref) < 2e-5
    assert rel_err(S, S_ref) < 2e-5


def test_bf16_inputs():
    x = random_op_inputs(13, T=50, H=1, HV=2, K=16, V=32, with_state=True)
    xb = {n: (jnp.asarray(a, jnp.bfloat16) if n in ("q", "k", "v") else a) for n, a in x.items()}
    o, S = run_op(xb, impl="pallas", chunk_size=16)
    o_ref, S_ref = gated_delta_rule_oracle(**{n: np.asarray(jnp.asarray(a, jnp.float32)) for n, a in xb.items()})
    assert o.dtype == jnp.bfloat16
    assert rel_err(o, o_ref) < 1e-2
    assert rel_err(S, S_ref) < 1e-2


@pytest.mark.parametrize("case, chunk_size", [
    (dict(T=40, H=1, HV=2, K=16, V=16, num_docs=3), 16),          # GVA, documents, ragged T
    (dict(T=35, K=20, V=24, g_value=0.0), 32),                     # non-pow2 heads, no decay
])
def test_gradients_match_scan(case, chunk_size):
    x = random_op_inputs(14, with_state=True, **case)
    args = [jnp.asarray(x[n]) for n in (*OP_ARGS, "initial_state")]
    argnums = tuple(range(6))
    grads_ref = jax.grad(loss_with_random_cotangents("scan", x, 15), argnums)(*args)
    grads = jax.grad(loss_with_random_cotangents("pallas", x, 15, chunk_size), argnums)(*args)
    for name, gr, gp in zip((*OP_ARGS, "initial_state"), grads_ref, grads):
        assert np.isfinite(np.asarray(gp)).all(), name
        assert rel_err(gp, gr) < 1e-4, (name, rel_err(gp, gr))


def test_gradients_with_several_key_and_value_tiles():
    """Small tiles force the inner loops over value tiles and the grid over key tiles."""
    x = random_op_inputs(16, B=1, T=64, H=1, HV=2, K=20, V=40, with_state=True, num_docs=3)
    reset = resets_from_segment_ids(jnp.asarray(x["segment_ids"]))
    rng = np.random.default_rng(17)
    dO = jnp.asarray(rng.standard_normal(x["v"].shape), jnp.float32)
    dS = jnp.asarray(rng.standard_normal(x["initial_state"].shape), jnp.float32)

    def loss(fn, **kw):
        def f(q, k, v, g, beta, S0):
            o, S = fn(q, k, v, g, beta, initial_state=S0, reset=reset, chunk_size=32, scale=0.3, **kw)
            return jnp.vdot(o, dO) + jnp.vdot(S, dS)
        return f

    def scan_fn(q, k, v, g, beta, *, initial_state, reset, chunk_size, scale):
        seg = jnp.asarray(x["segment_ids"])
        return gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, segment_ids=seg,
                                output_final_state=True, impl="scan", scale=scale)

    args = [jnp.asarray(x[n]) for n in (*OP_ARGS, "initial_state")]
    grads_ref = jax.grad(loss(scan_fn), tuple(range(6)))(*args)
    grads = jax.grad(loss(pallas_gated_delta_rule, block_v=16, inner_block_v=16, block_k=16),
                     tuple(range(6)))(*args)
    for name, gr, gp in zip((*OP_ARGS, "initial_state"), grads_ref, grads):
        assert rel_err(gp, gr) < 1e-4, (name, rel_err(gp, gr))
