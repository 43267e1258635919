"""The public op, impl="scan" and impl="chunk", against the float64 oracle and against each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.ops import gated_delta_rule, gated_delta_rule_step
from op_inputs import random_op_inputs
from oracle import gated_delta_rule_oracle

IMPLS = ("scan", "chunk")
OP_ARGS = ("q", "k", "v", "g", "beta")

# (name, shape/options) covering: T not a multiple of the chunk, T = 1, GVA, documents, initial state.
CASES = {
    "ragged_T": dict(T=37),
    "T1": dict(T=1, with_state=True),
    "gva": dict(H=1, HV=3, T=40),
    "docs": dict(T=70, num_docs=4),
    "state": dict(T=50, with_state=True),
    "everything": dict(T=83, H=2, HV=4, with_state=True, num_docs=5),
}


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def run_op(x, **kw):
    args = [jnp.asarray(x[n]) for n in OP_ARGS]
    opt = {n: jnp.asarray(x[n]) for n in ("initial_state", "segment_ids") if n in x}
    return gated_delta_rule(*args, output_final_state=True, **opt, **kw)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl, chunk_size", [("scan", 64), ("chunk", 16), ("chunk", 32), ("chunk", 64)])
def test_matches_float64_oracle(case, impl, chunk_size):
    x = random_op_inputs(0, **CASES[case])
    o, S = run_op(x, impl=impl, chunk_size=chunk_size)
    o_ref, S_ref = gated_delta_rule_oracle(**x)
    assert o.dtype == jnp.float32 and S.dtype == jnp.float32
    assert rel_err(o, o_ref) < 2e-5
    assert rel_err(S, S_ref) < 2e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("edge", [dict(g_value=0.0), dict(g_value=-30.0), dict(beta_value=0.0),
                                  dict(beta_value=1.0), dict(g_value=0.0, beta_value=1.0)])
def test_edge_gates_are_finite_and_exact(impl, edge):
    x = random_op_inputs(1, T=45, H=2, HV=2, with_state=True, num_docs=3, **edge)
    o, S = run_op(x, impl=impl, chunk_size=16)
    o_ref, S_ref = gated_delta_rule_oracle(**x)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(S)).all()
    assert rel_err(o, o_ref) < 2e-5
    assert rel_err(S, S_ref) < 2e-5


def loss_with_random_cotangents(impl, x, seed, chunk_size=16):
    """<o, dO> + <S, dS> with fixed random cotangents dO, dS, as a function of the op's inputs."""
    rng = np.random.default_rng(seed)
    B, T, HV, V = x["v"].shape
    K = x["q"].shape[-1]
    dO = jnp.asarray(rng.standard_normal((B, T, HV, V)), jnp.float32)
    dS = jnp.asarray(rng.standard_normal((B, HV, K, V)), jnp.float32)
    seg = None if "segment_ids" not in x else jnp.asarray(x["segment_ids"])

    def f(q, k, v, g, beta, initial_state):
        o, S = gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, segment_ids=seg,
                                output_final_state=True, impl=impl, chunk_size=chunk_size)
        return jnp.vdot(o, dO) + jnp.vdot(S, dS)
    return f


@pytest.mark.parametrize("case", ["ragged_T", "gva", "everything"])
@pytest.mark.parametrize("g_value", [None, 0.0])
def test_chunk_gradients_match_scan(case, g_value):
    x = random_op_inputs(2, g_value=g_value, **{**CASES[case], "with_state": True})
    args = [jnp.asarray(x[n]) for n in (*OP_ARGS, "initial_state")]
    argnums = tuple(range(6))
    grads_ref = jax.grad(loss_with_random_cotangents("scan", x, 3), argnums)(*args)
    grads = jax.grad(loss_with_random_cotangents("chunk", x, 3), argnums)(*args)
    for name, gr, gc in zip((*OP_ARGS, "initial_state"), grads_ref, grads):
        assert np.isfinite(np.asarray(gc)).all(), name
        assert rel_err(gc, gr) < 1e-4, (name, rel_err(gc, gr))


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs(impl):
    x = random_op_inputs(4, T=70, H=2, HV=4, K=16, V=16, with_state=True, num_docs=2)
    xb = {n: (a.astype(jnp.bfloat16) if n in ("q", "k", "v") else a) for n, a in x.items()}
    o, S = run_op(xb, impl=impl, chunk_size=32)
    # The oracle sees exactly the bf16-rounded inputs, so only the op's own rounding is measured.
    o_ref, S_ref = gated_delta_rule_oracle(**{n: np.asarray(jnp.asarray(a, jnp.float32)) if n != "segment_ids"
                                              else a for n, a in xb.items()})
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert rel_err(o, o_ref) < 1e-2
    assert rel_err(S, S_ref) < 1e-4


def test_decode_steps_equal_scan():
    x = random_op_inputs(5, T=19, H=1, HV=2, with_state=True)
    o_ref, S_ref = run_op(x, impl="scan")
    S = jnp.asarray(x["initial_state"])
    outs = []
    for t in range(x["q"].shape[1]):
        o_t, S = gated_delta_rule_step(*(jnp.asarray(x[n][:, t]) for n in OP_ARGS), S)
        outs.append(o_t)
    assert rel_err(jnp.stack(outs, 1), o_ref) < 1e-6
    assert rel_err(S, S_ref) < 1e-6


def test_chunk_prefill_then_decode_equals_one_scan():
    x = random_op_inputs(6, T=53, H=2, HV=4)
    P = 40
    o_full, S_full = run_op(x, impl="scan")
    o_pre, S = run_op({n: a[:, :P] for n, a in x.items()}, impl="chunk", chunk_size=16)
    outs = [o_pre]
    for t in range(P, x["q"].shape[1]):
        o_t, S = gated_delta_rule_step(*(jnp.asarray(x[n][:, t]) for n in OP_ARGS), S)
        outs.append(o_t[:, None])
    assert rel_err(jnp.concatenate(outs, 1), o_full) < 1e-5
    assert rel_err(S, S_full) < 1e-5


def test_final_state_is_none_unless_asked():
    x = random_op_inputs(7, T=5)
    o, S = gated_delta_rule(*(jnp.asarray(x[n]) for n in OP_ARGS), impl="chunk")
    assert S is None
    o_ref, _ = gated_delta_rule_oracle(**x)
    assert rel_err(o, o_ref) < 2e-5


def test_scale_is_applied_to_q():
    x = random_op_inputs(8, T=20)
    o, _ = run_op(x, impl="chunk", scale=0.3)
    o_ref, _ = gated_delta_rule_oracle(**x, scale=0.3)
    assert rel_err(o, o_ref) < 2e-5


def test_runs_under_jit():
    x = random_op_inputs(9, T=33, num_docs=2)
    f = jax.jit(lambda *a, seg: gated_delta_rule(*a, segment_ids=seg, impl="chunk", chunk_size=16)[0])
    o = f(*(jnp.asarray(x[n]) for n in OP_ARGS), seg=jnp.asarray(x["segment_ids"]))
    o_ref, _ = gated_delta_rule_oracle(**x)
    assert rel_err(o, o_ref) < 2e-5
