"""Every Pallas backend (interpret mode on a CPU) against the float64 oracle and the scan reference.

One set of cases runs on each backend in gdn_jax.impls: "pallas_triton" in float32 (tight tolerances)
and bf16, "pallas_mosaic" in bf16 (its wgmma operands). The Mosaic backend's interpret mode needs
jax >= 0.12; on older jax its cases are skipped with that reason (CI runs them on Python 3.12).
bf16 cases compare against references fed exactly the bf16-rounded inputs, so only the kernels' own
rounding is measured.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import impls
from gdn_jax.ops import gated_delta_rule, resets_from_segment_ids
from kernels_pallas import pallas_gated_delta_rule
from op_inputs import random_op_inputs
from jaxpr_eqns import all_eqns
from oracle import gated_delta_rule_oracle
from test_ops import OP_ARGS, rel_err

BF16 = jnp.bfloat16
# (impl, input dtype): every backend with the dtypes it runs. The Mosaic sweeps need C = 64 and head
# dims that pad to multiples of 64, so each case below keeps to those.
BACKENDS = [("pallas_triton", jnp.float32), ("pallas_triton", BF16), ("pallas_mosaic", BF16)]
# Relative-error bounds per input dtype: (forward vs oracle, gradients vs scan).
TOL = {jnp.float32: (2e-5, 1e-4), BF16: (1e-2, 2e-2)}


def _skip_unless_runs(impl, dtype, K=64, V=64):
    reason = impls.IMPLEMENTATIONS[impl].supports(dtype, K, V, 64)
    if reason is not None:
        pytest.skip(reason)


def _rounded(x, dtype):
    """The inputs as the kernel sees them (q, k, v in dtype) and as float32 arrays for the references."""
    ops_in = {n: (jnp.asarray(a).astype(dtype) if n in ("q", "k", "v") else jnp.asarray(a)) for n, a in x.items()}
    ref_in = {n: np.asarray(a.astype(jnp.float32)) if n in ("q", "k", "v") else np.asarray(a)
              for n, a in ops_in.items()}
    return ops_in, ref_in


def boundaries_at(B, T, cuts):
    """segment_ids with a new document starting at each position in cuts."""
    return np.broadcast_to((np.arange(T)[:, None] >= np.asarray(cuts)[None, :]).sum(-1), (B, T)).astype(np.int32)


def _run(x, impl, **launch):
    """The op on these inputs through one backend; launch options go to the kernels."""
    args = [x[n] for n in OP_ARGS]
    S0 = x.get("initial_state")
    seg = x.get("segment_ids")
    if not launch:
        return gated_delta_rule(*args, initial_state=S0, segment_ids=seg, output_final_state=True,
                                impl=impl, chunk_size=64)
    B, T, H, K = args[0].shape
    S0 = jnp.zeros((B, args[2].shape[2], K, args[2].shape[3]), jnp.float32) if S0 is None else S0
    reset = None if seg is None else resets_from_segment_ids(seg)
    sweeps = impl.removeprefix("pallas_")
    pad = -T % 64
    padded = [jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in args]
    reset = None if reset is None else jnp.pad(reset, [(0, 0), (0, pad)])
    o, S = pallas_gated_delta_rule(*padded, scale=K ** -0.5, initial_state=S0, reset=reset,
                                   chunk_size=64, sweeps=sweeps, **launch)
    return o[:, :T], S


CASES = {
    # name: random_op_inputs options
    "ragged_T_gva_state": dict(B=1, T=150, H=1, HV=2, K=64, V=64, with_state=True),
    # V = 160 runs padded to 192 (three 64-column tiles, six of 32), not to 256
    "non_pow2_heads": dict(B=1, T=100, H=1, K=100, V=160, with_state=True),
    "documents": dict(B=2, T=192, H=1, K=64, V=64, with_state=True, num_docs=4),
    "T1": dict(B=1, T=1, H=1, K=64, V=64, with_state=True),
    "k256": dict(B=1, T=128, H=1, K=256, V=64, with_state=True),  # Mosaic: in-place state update
}


@pytest.mark.parametrize("impl, dtype", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_oracle(impl, dtype, case):
    opts = CASES[case]
    _skip_unless_runs(impl, dtype, opts["K"], opts["V"])
    x, ref = _rounded(random_op_inputs(10, **opts), dtype)
    o, S = _run(x, impl)
    o_ref, S_ref = gated_delta_rule_oracle(**ref)
    assert o.dtype == dtype and S.dtype == jnp.float32
    assert rel_err(o, o_ref) < TOL[dtype][0]
    assert rel_err(S, S_ref) < TOL[dtype][0]


@pytest.mark.parametrize("impl, dtype", BACKENDS)
def test_documents_starting_at_and_inside_chunk_boundaries(impl, dtype):
    _skip_unless_runs(impl, dtype)
    x = random_op_inputs(11, B=2, T=256, H=1, K=64, V=64, with_state=True)
    x["segment_ids"] = boundaries_at(2, 256, [64, 100, 101, 128, 255])  # chunk starts 64, 128
    x, ref = _rounded(x, dtype)
    o, S = _run(x, impl)
    o_ref, S_ref = gated_delta_rule_oracle(**ref)
    assert rel_err(o, o_ref) < TOL[dtype][0]
    assert rel_err(S, S_ref) < TOL[dtype][0]


@pytest.mark.parametrize("impl, dtype", BACKENDS)
@pytest.mark.parametrize("edge", [dict(g_value=0.0, beta_value=1.0), dict(g_value=-30.0),
                                  dict(beta_value=0.0)])
def test_edge_gates(impl, dtype, edge):
    _skip_unless_runs(impl, dtype)
    x, ref = _rounded(random_op_inputs(12, B=1, T=128, H=1, K=64, V=64, with_state=True, num_docs=2,
                                       **edge), dtype)
    o, S = _run(x, impl)
    o_ref, S_ref = gated_delta_rule_oracle(**ref)
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(S)).all()
    assert rel_err(o, o_ref) < TOL[dtype][0]
    assert rel_err(S, S_ref) < TOL[dtype][0]


def _grads(x, dtype, impl, seed, **launch):
    """Gradients of <o, dO> + <S, dS> (random cotangents) w.r.t. q, k, v, g, beta, initial_state."""
    rng = np.random.default_rng(seed)
    dO = jnp.asarray(rng.standard_normal(x["v"].shape), jnp.float32)
    dS = jnp.asarray(rng.standard_normal(x["initial_state"].shape), jnp.float32)

    def loss(q, k, v, g, beta, S0):
        inputs = {**x, "q": q.astype(dtype), "k": k.astype(dtype), "v": v.astype(dtype), "g": g,
                  "beta": beta, "initial_state": S0}
        o, S = _run(inputs, impl, **launch)
        return jnp.vdot(o.astype(jnp.float32), dO) + jnp.vdot(S, dS)

    args = [jnp.asarray(x[n], jnp.float32) for n in (*OP_ARGS, "initial_state")]
    return jax.grad(loss, tuple(range(6)))(*args)


def _assert_grads_close(grads, grads_ref, tol):
    """Every gradient (q, k, v, g, beta, initial_state) within relative error tol of the reference."""
    for name, gr, gp in zip((*OP_ARGS, "initial_state"), grads_ref, grads):
        assert rel_err(gp, gr) < tol, (name, rel_err(gp, gr))


GRAD_CASES = {
    "gva_documents_ragged": dict(B=1, T=170, H=1, HV=2, K=64, V=64, num_docs=3),
    "non_pow2_heads_no_decay": dict(B=1, T=96, H=1, K=100, V=80, g_value=0.0),
    "value_dim_padded_to_tiles": dict(B=1, T=64, H=1, K=64, V=144),  # runs as V = 192
}
# The Mosaic chunk-gradient kernels hold a chunk's [K, V] state tiles whole: K, V <= 128.
MOSAIC_GRAD_CASES = [c for c, o in GRAD_CASES.items() if o["V"] <= 128]


@pytest.mark.parametrize("impl, dtype", BACKENDS)
@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_match_scan(impl, dtype, case):
    opts = GRAD_CASES[case]
    _skip_unless_runs(impl, dtype, opts["K"], opts["V"])
    _, x = _rounded(random_op_inputs(14, with_state=True, **opts), dtype)
    grads_ref = _grads(x, jnp.float32, "scan", 15)
    grads = _grads(x, dtype, impl, 15)
    for name, gr, gp in zip((*OP_ARGS, "initial_state"), grads_ref, grads):
        assert np.isfinite(np.asarray(gp)).all(), name
        assert rel_err(gp, gr) < TOL[dtype][1], (name, rel_err(gp, gr))


@pytest.mark.parametrize("impl, dtype", BACKENDS)
def test_context_parallel_segments_equal_one_sweep(impl, dtype):
    """Sequence segments swept side by side and joined (kernels_pallas/context_parallel.py) give the
    unsegmented result, forward and gradients, with documents that cross segment boundaries."""
    _skip_unless_runs(impl, dtype)
    x = random_op_inputs(19, B=1, T=512, H=1, HV=2, K=64, V=64, with_state=True)
    x["segment_ids"] = boundaries_at(1, 512, [100, 128, 300, 384])  # segment starts at 128, 256, 384
    x, ref = _rounded(x, dtype)
    o_ref, S_ref = gated_delta_rule_oracle(**ref)
    for segments in (2, 4):
        o, S = _run(x, impl, segments=segments)
        assert rel_err(o, o_ref) < TOL[dtype][0], segments
        assert rel_err(S, S_ref) < TOL[dtype][0], segments
    grads_ref = _grads(ref, jnp.float32, "scan", 20)
    grads = _grads(ref, dtype, impl, 20, segments=4)
    _assert_grads_close(grads, grads_ref, TOL[dtype][1])


def test_mosaic_warp_specialised_forward_matches_oracle():
    """The three-warpgroup forward sweep (state, output, memory groups handing tiles over through
    barriers) computes what the one-warpgroup sweep does."""
    _skip_unless_runs("pallas_mosaic", BF16)
    x, ref = _rounded(random_op_inputs(21, B=1, T=320, H=1, HV=2, K=64, V=128, with_state=True,
                                       num_docs=3), BF16)
    o, S = _run(x, "pallas_mosaic", mosaic_warpgroups=2, segments=1)
    o_one, S_one = _run(x, "pallas_mosaic", mosaic_warpgroups=1, segments=1)
    o_ref, S_ref = gated_delta_rule_oracle(**ref)
    assert rel_err(o, o_ref) < TOL[BF16][0] and rel_err(S, S_ref) < TOL[BF16][0]
    assert rel_err(o, o_one) < 1e-6 and rel_err(S, S_one) < 1e-6


@pytest.mark.parametrize("warpgroups", [1, 2])
def test_mosaic_forward_keeping_residuals_gives_the_scan_gradients(warpgroups):
    """keep_residuals: the differentiated forward stores the states and Vnew from its output sweep
    (one or three warpgroups) and the backward uses them instead of sweeping again."""
    _skip_unless_runs("pallas_mosaic", BF16)
    _, x = _rounded(random_op_inputs(24, B=1, T=200, H=1, HV=2, K=64, V=128, with_state=True,
                                     num_docs=3), BF16)
    grads_ref = _grads(x, jnp.float32, "scan", 25)
    grads = _grads(x, BF16, "pallas_mosaic", 25, keep_residuals=True, mosaic_warpgroups=warpgroups,
                   segments=1)
    _assert_grads_close(grads, grads_ref, TOL[BF16][1])


ALL_MOSAIC_KNOBS = dict(mosaic_warpgroups=2, reverse_warpgroups=2, key_grads="fused",
                        keep_residuals=True, mosaic_prepare=True, segments=1)


@pytest.mark.parametrize("edge", [dict(g_value=0.0, beta_value=1.0), dict(g_value=-30.0),
                                  dict(beta_value=0.0)])
def test_all_mosaic_kernels_together_at_edge_gates(edge):
    """Every Mosaic kernel at once (warp-specialised sweeps, fused gradients, kept residuals, Mosaic
    prepare) at a gate of exactly 1 with beta 1, a decay of e^-30 and beta 0, with documents:
    outputs and all gradients finite and equal to the scan reference's."""
    _skip_unless_runs("pallas_mosaic", BF16)
    _, x = _rounded(random_op_inputs(12, B=1, T=128, H=1, K=64, V=64, with_state=True, num_docs=2,
                                     **edge), BF16)
    o, S = _run({**x, **{n: jnp.asarray(x[n]).astype(BF16) for n in ("q", "k", "v")}},
                "pallas_mosaic", **ALL_MOSAIC_KNOBS)
    o_ref, S_ref = gated_delta_rule_oracle(**x)
    assert rel_err(o, o_ref) < TOL[BF16][0] and rel_err(S, S_ref) < TOL[BF16][0]
    grads_ref = _grads(x, jnp.float32, "scan", 31)
    grads = _grads(x, BF16, "pallas_mosaic", 31, **ALL_MOSAIC_KNOBS)
    for name, gr, gp in zip((*OP_ARGS, "initial_state"), grads_ref, grads):
        assert np.isfinite(np.asarray(gp)).all(), name
        # At a decay of e^-30, dg is ~1e-12 and bf16 noise sets its relative error for every kernel
        # (the Triton ones too): there the bound is absolute, far below what a lost cancellation gives.
        err = np.max(np.abs(np.asarray(gp, np.float64) - np.asarray(gr, np.float64)))
        assert rel_err(gp, gr) < TOL[BF16][1] or err < 1e-9, (name, rel_err(gp, gr), err)


def test_all_mosaic_kernels_together_with_segments():
    """The same kernels under context parallelism inside the device (2 segments; kept residuals
    apply to one segment only, so the backward sweeps again), GVA and documents."""
    _skip_unless_runs("pallas_mosaic", BF16)
    _, x = _rounded(random_op_inputs(32, B=1, T=256, H=1, HV=2, K=64, V=64, with_state=True,
                                     num_docs=3), BF16)
    grads_ref = _grads(x, jnp.float32, "scan", 33)
    grads = _grads(x, BF16, "pallas_mosaic", 33, **{**ALL_MOSAIC_KNOBS, "segments": 2})
    _assert_grads_close(grads, grads_ref, TOL[BF16][1])


def test_mosaic_prepare_matches_the_triton_inverse_and_the_op_matches_scan():
    """mosaic_prepare: T = (I + A)^-1 from split-bf16 wgmma doubling steps equals the Triton
    kernel's T (bf16 rounding apart), with documents; and the op through it gives scan's gradients."""
    _skip_unless_runs("pallas_mosaic", BF16)
    from kernels_pallas import forward, mosaic_prepare
    from kernels_pallas.gated_delta_rule import document_masks, make_tiling
    x, ref = _rounded(random_op_inputs(28, B=1, T=192, H=1, HV=2, K=64, V=64, with_state=True,
                                       num_docs=3), BF16)
    t = make_tiling(B=1, T=192, H=1, HV=2, K=64, V=64, chunk_size=64, scale=0.125, has_docs=True,
                    dtype=BF16, sweeps="mosaic", segments=1)
    ch = lambda a: jnp.asarray(a).reshape(1, t.N, t.C, *jnp.asarray(a).shape[2:])
    docs = document_masks(resets_from_segment_ids(jnp.asarray(x["segment_ids"])), t.N, t.C)
    k, v, g, beta = (ch(x[n]) for n in ("k", "v", "g", "beta"))
    T_mosaic = mosaic_prepare.prepare_T(k, g, beta, docs, t)
    T_triton = forward.prepare(k, v, g, beta, docs, t, BF16, t_only=True)
    assert rel_err(T_mosaic, T_triton) < 5e-3, rel_err(T_mosaic, T_triton)
    grads_ref = _grads(ref, jnp.float32, "scan", 29)
    grads = _grads(ref, BF16, "pallas_mosaic", 29, mosaic_prepare=True, segments=1)
    _assert_grads_close(grads, grads_ref, TOL[BF16][1])


def test_mosaic_warp_specialised_reverse_sweep_gives_the_scan_gradients():
    """reverse_warpgroups=2: the reverse sweep with a helper warpgroup forming the dS-free products
    a chunk ahead gives the scan reference's gradients, and the one-warpgroup sweep's."""
    _skip_unless_runs("pallas_mosaic", BF16)
    _, x = _rounded(random_op_inputs(26, B=1, T=200, H=1, HV=2, K=64, V=128, with_state=True,
                                     num_docs=3), BF16)
    grads_ref = _grads(x, jnp.float32, "scan", 27)
    grads = _grads(x, BF16, "pallas_mosaic", 27, reverse_warpgroups=2, segments=1)
    grads_one = _grads(x, BF16, "pallas_mosaic", 27, reverse_warpgroups=1, segments=1)
    for name, gr, gp, g1 in zip((*OP_ARGS, "initial_state"), grads_ref, grads, grads_one):
        assert rel_err(gp, gr) < TOL[BF16][1], (name, rel_err(gp, gr))
        assert rel_err(gp, g1) < 1e-6, (name, rel_err(gp, g1))


@pytest.mark.parametrize("key_grads", ["mosaic", "fused"])
@pytest.mark.parametrize("case", MOSAIC_GRAD_CASES)
def test_mosaic_gradient_kernels_match_scan(case, key_grads):
    """key_grads="mosaic" (one program per chunk and value head, row scalings folded into operands)
    and "fused" (the pair and key gradients in one Mosaic program) give the gradients of the scan
    reference, like the Triton kernels they replace."""
    opts = GRAD_CASES[case]
    _skip_unless_runs("pallas_mosaic", BF16, opts["K"], opts["V"])
    _, x = _rounded(random_op_inputs(22, with_state=True, **opts), BF16)
    grads_ref = _grads(x, jnp.float32, "scan", 23)
    grads = _grads(x, BF16, "pallas_mosaic", 23, key_grads=key_grads, segments=1)
    _assert_grads_close(grads, grads_ref, TOL[BF16][1])


def test_triton_forward_keeping_residuals_gives_the_same_gradients():
    """keep_residuals on the Triton sweeps: the differentiated forward's output sweep also writes the
    states and Vnew, and the backward uses them instead of its residual sweep: the scan reference's
    gradients, and the residual sweep's to float32 rounding (GVA, documents, K = 100, V = 80)."""
    _, x = _rounded(random_op_inputs(34, B=1, T=150, H=1, HV=2, K=100, V=80, with_state=True,
                                     num_docs=3), jnp.float32)
    grads_ref = _grads(x, jnp.float32, "scan", 35)
    kept = _grads(x, jnp.float32, "pallas_triton", 35, keep_residuals=True, segments=1)
    swept = _grads(x, jnp.float32, "pallas_triton", 35, keep_residuals=False, segments=1)
    _assert_grads_close(kept, grads_ref, TOL[jnp.float32][1])
    for name, a, b in zip((*OP_ARGS, "initial_state"), kept, swept):
        assert rel_err(a, b) < 1e-6, (name, rel_err(a, b))
    # Kept, the backward runs neither the residual sweep nor a second prepare (it reuses W).
    args = [jnp.asarray(x[n]) for n in (*OP_ARGS, "initial_state")]
    kernels = {keep: _kernel_names(args, keep_residuals=keep) for keep in (True, False)}
    assert kernels[True].count("gdn_prepare") == 1 and "gdn_sweep_residuals" not in kernels[True]
    assert kernels[False].count("gdn_prepare") == 2 and "gdn_sweep_residuals" in kernels[False]


def test_triton_split_output_forms_the_same_output_and_gradients():
    """split_output: the forward's residual sweep writes the states and Vnew, a chunk-parallel kernel
    forms O from them, and the backward reuses them: the float64 oracle's output, the scan
    reference's gradients, and the fused sweep's to float32 rounding (GVA, documents, K = 100,
    V = 80, an initial state); the backward runs no residual sweep and no second prepare."""
    _, x = _rounded(random_op_inputs(36, B=1, T=150, H=1, HV=2, K=100, V=80, with_state=True,
                                     num_docs=3), jnp.float32)
    o, S = _run(x, "pallas_triton", split_output=True, segments=1)
    o_fused, S_fused = _run(x, "pallas_triton", segments=1)
    o_ref, S_ref = gated_delta_rule_oracle(**x)
    assert rel_err(o, o_ref) < TOL[jnp.float32][0] and rel_err(S, S_ref) < TOL[jnp.float32][0]
    assert rel_err(o, o_fused) < 1e-6 and rel_err(S, S_fused) < 1e-6
    split = _grads(x, jnp.float32, "pallas_triton", 37, split_output=True, segments=1)
    fused = _grads(x, jnp.float32, "pallas_triton", 37, segments=1)
    _assert_grads_close(split, _grads(x, jnp.float32, "scan", 37), TOL[jnp.float32][1])
    for name, a, b in zip((*OP_ARGS, "initial_state"), split, fused):
        assert rel_err(a, b) < 1e-6, (name, rel_err(a, b))
    args = [jnp.asarray(x[n]) for n in (*OP_ARGS, "initial_state")]
    kernels = _kernel_names(args, split_output=True)
    assert kernels.count("gdn_sweep_residuals") == 1 and "gdn_output_from_states" in kernels
    assert "gdn_sweep_output" not in kernels and kernels.count("gdn_prepare") == 1
    # Under context parallelism the segments' sweeps form O themselves; bf16 runs too.
    o2, S2 = _run(x, "pallas_triton", split_output=True, segments=3)
    assert rel_err(o2, o_ref) < TOL[jnp.float32][0] and rel_err(S2, S_ref) < TOL[jnp.float32][0]
    xb, _ = _rounded(x, BF16)
    ob, _ = _run(xb, "pallas_triton", split_output=True, segments=1)
    assert rel_err(ob, _run(xb, "pallas_triton", segments=1)[0]) < 1e-2
    from kernels_pallas.gated_delta_rule import make_tiling
    with pytest.raises(ValueError, match="split_output"):
        make_tiling(B=1, T=64, H=1, HV=1, K=64, V=64, chunk_size=64, scale=0.1, has_docs=False,
                    dtype=BF16, sweeps="mosaic", split_output=True)


@pytest.mark.parametrize("K, dtype, sweeps, expected", [
    (256, BF16, "triton", True), (200, BF16, "triton", True),  # padded to 256: the paper's layer
    (256, jnp.float32, "triton", False), (128, BF16, "triton", False), (128, BF16, "mosaic", False)])
def test_split_output_is_the_default_where_it_was_measured_faster(K, dtype, sweeps, expected):
    """split_output defaults on with the Triton sweeps at padded K > 128 and 16-bit inputs (measured
    19-20% faster forward+backward there) and off elsewhere; an explicit value wins."""
    from kernels_pallas.gated_delta_rule import make_tiling
    shape = dict(B=1, T=128, H=1, HV=1, K=K, V=64, chunk_size=64, scale=0.1, has_docs=False,
                 dtype=dtype, sweeps=sweeps, interpret=True)
    if sweeps == "mosaic":
        shape.update(mosaic_warpgroups=1, reverse_warpgroups=1, key_grads="triton")
        from kernels_pallas import mosaic_common
        if not mosaic_common.interpret_supported():
            pytest.skip("Mosaic tilings need jax >= 0.12 off the GPU")
    assert make_tiling(**shape).split_output is expected
    if sweeps == "triton":
        assert make_tiling(**shape, split_output=not expected).split_output is (not expected)


def test_launch_defaults_reach_the_kernels_traced_inside_only():
    """kernels_pallas.launch_defaults sets launch parameters for every call traced in its block
    (through gdn_jax.ops), a call's own parameters win, the previous defaults come back after the
    block, and an unknown name is refused naming it."""
    from kernels_pallas import launch_defaults
    x = random_op_inputs(38, B=1, T=64, H=1, HV=1, K=32, V=16, with_state=True)
    args = [jnp.asarray(x[n]) for n in OP_ARGS]

    def kernels(**launch):
        def loss(q):
            if launch:
                o, _ = pallas_gated_delta_rule(q, *args[1:], scale=0.1, initial_state=x["initial_state"],
                                               reset=None, chunk_size=64, sweeps="triton", **launch)
            else:
                o, _ = gated_delta_rule(q, *args[1:], initial_state=x["initial_state"],
                                        impl="pallas_triton")
            return o.sum()
        jaxpr = jax.make_jaxpr(jax.grad(loss))(args[0]).jaxpr
        return [e.params["name"] for e in all_eqns(jaxpr) if e.primitive.name == "pallas_call"]

    assert "gdn_output_from_states" not in kernels()  # K = 32: off by default
    with launch_defaults(split_output=True, segments=1):
        assert "gdn_output_from_states" in kernels()
        assert "gdn_output_from_states" not in kernels(split_output=False)
        with launch_defaults(split_output=False):
            assert "gdn_output_from_states" not in kernels()
        assert "gdn_output_from_states" in kernels()
    assert "gdn_output_from_states" not in kernels()
    with pytest.raises(ValueError, match="split_outptu"):
        with launch_defaults(split_outptu=True):
            pass


def _kernel_names(args, **launch):
    """The Pallas kernels, in order, of the Triton op's forward and backward on these inputs."""
    def loss(q, k, v, g, beta, S0):
        o, S = pallas_gated_delta_rule(q, k, v, g, beta, scale=0.1, initial_state=S0, reset=None,
                                       chunk_size=64, sweeps="triton", segments=1, **launch)
        return o.sum() + S.sum()
    T_pad = -args[0].shape[1] % 64
    args = [jnp.pad(a, [(0, 0), (0, T_pad)] + [(0, 0)] * (a.ndim - 2)) if i < 5 else a
            for i, a in enumerate(args)]
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=tuple(range(6))))(*args).jaxpr
    return [e.params["name"] for e in all_eqns(jaxpr) if e.primitive.name == "pallas_call"]


@pytest.mark.parametrize("segments, loop_stages", [(1, 1), (2, 1), (1, 2)])
def test_triton_gradients_with_several_key_and_value_tiles(segments, loop_stages):
    """Small tiles force the Triton kernels' inner loops over value tiles (unrolled, or a pipelined
    loop) and the grid over key tiles; the backward's residual sweep runs on its own value tile (32
    against the other sweeps' 16), alone and under context parallelism."""
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
    grads = jax.grad(loss(pallas_gated_delta_rule, sweeps="triton", block_v=16, residual_block_v=32,
                          inner_block_v=16, block_k=16, segments=segments, loop_stages=loop_stages),
                     tuple(range(6)))(*args)
    for name, gr, gp in zip((*OP_ARGS, "initial_state"), grads_ref, grads):
        assert rel_err(gp, gr) < 1e-4, (name, rel_err(gp, gr))


def test_triton_small_chunks_and_heads_match_oracle():
    """Chunk sizes 16 and 32 and head dims below 64 (Triton only)."""
    for C, opts in ((16, dict(T=45, H=1, HV=2, K=16, V=16)), (32, dict(T=40, K=20, V=40, num_docs=2))):
        x = random_op_inputs(10, with_state=True, **opts)
        args = [jnp.asarray(x[n]) for n in OP_ARGS]
        seg = None if "segment_ids" not in x else jnp.asarray(x["segment_ids"])
        o, S = gated_delta_rule(*args, initial_state=jnp.asarray(x["initial_state"]), segment_ids=seg,
                                output_final_state=True, impl="pallas_triton", chunk_size=C)
        o_ref, S_ref = gated_delta_rule_oracle(**x)
        assert rel_err(o, o_ref) < 2e-5 and rel_err(S, S_ref) < 2e-5, C


def test_pallas_means_a_backend_that_runs_here():
    """Without a GPU "pallas" is the Triton kernels in interpret mode; an impl that cannot run the
    call names why."""
    if jax.default_backend() != "gpu":
        assert impls.resolve("pallas", dtype=BF16, K=128, V=128, chunk_size=64) == "pallas_triton"
    # Under jax < 0.11 the reason given is the jax version.
    with pytest.raises(ValueError, match="chunk_size must be 64|jax >= 0.11"):
        impls.resolve("pallas_mosaic", dtype=BF16, K=128, V=128, chunk_size=32)
    with pytest.raises(ValueError, match="bfloat16 or float16|jax >= 0.11"):
        impls.resolve("pallas_mosaic", dtype=jnp.float32, K=128, V=128, chunk_size=64)


@pytest.mark.parametrize("mode", ["output", "output_ws", "residuals", "final", "reverse", "key_grads",
                                  "chunk_grads", "output_residuals", "output_residuals_ws",
                                  "reverse_ws", "prepare"])
@pytest.mark.parametrize("docs", [False, True])
def test_mosaic_kernels_lower_for_hopper(monkeypatch, mode, docs):
    """Lowers the Mosaic sweeps for CUDA on this CPU, as if for a Hopper GPU: Mosaic's layout
    inference and shared-memory planning run here, so a kernel that would not compile on the GPU
    fails in CI rather than on the device."""
    _lower_mosaic_kernel(monkeypatch, mode, docs, K=128, V=128)


@pytest.mark.parametrize("mode", ["output", "residuals", "reverse"])
def test_one_warpgroup_sweeps_lower_at_k256(monkeypatch, mode):
    """K = 256 (the 1.3B models' heads) runs the one-warpgroup sweeps; they lower for Hopper."""
    _lower_mosaic_kernel(monkeypatch, mode, False, K=256, V=128)


def _lower_mosaic_kernel(monkeypatch, mode, docs, K, V):
    from kernels_pallas import mosaic_common, mosaic_sweeps as ms
    from kernels_pallas.gated_delta_rule import make_tiling
    if (reason := mosaic_common.unsupported_reason(C=64, K=K, V=V, BV=64, dtype=BF16)) is not None:
        pytest.skip(reason)
    import jax.experimental.mosaic.gpu.utils as mgpu_utils
    monkeypatch.setattr(mgpu_utils, "_infer_arch", lambda: (9, 0))
    B, T, H, HV = 1, 192, 1, 2
    t = make_tiling(B=B, T=T, H=H, HV=HV, K=K, V=V, chunk_size=64, scale=0.1, has_docs=docs,
                    dtype=BF16, sweeps="mosaic", segments=1, interpret=False,
                    mosaic_warpgroups=2 if mode.endswith("_ws") else 1,
                    reverse_warpgroups=2 if mode == "reverse_ws" else 1)
    mode = mode.removesuffix("_ws")
    N, C = t.N, t.C
    q = jnp.zeros((B, N, C, H, K), BF16)
    v = jnp.zeros((B, N, C, HV, V), BF16)
    T_inv = jnp.zeros((B, N, C, HV, C), BF16)
    g = jnp.zeros((B, N, C, HV), jnp.float32)
    S0 = jnp.zeros((B, HV, K, V), jnp.float32)
    doc_masks = ()
    if docs:
        doc = jnp.zeros((B, N, C), jnp.int32)
        doc_masks = (doc, doc.astype(jnp.float32), doc.astype(jnp.float32))
    if mode == "key_grads":  # GVA, so dq and dk are written in float32
        from kernels_pallas import mosaic_grads
        t = t._replace(H=1, HV=2)
        states = jnp.zeros((B, N, HV, K, V), BF16)
        fn = lambda q, T_inv, g, v, S0: mosaic_grads.key_grads(
            q, q, g, g, doc_masks, T_inv, T_inv, states, states, v, v, v, t, BF16)
    elif mode == "chunk_grads":  # GVA, as above
        from kernels_pallas import mosaic_chunk_grads
        t = t._replace(H=1, HV=2)
        states = jnp.zeros((B, N, HV, K, V), BF16)
        fn = lambda q, T_inv, g, v, S0: mosaic_chunk_grads.chunk_grads(
            q, q, v, g, g, doc_masks, T_inv, v, v, v, states, states, t, BF16)
    elif mode == "prepare":
        from kernels_pallas import mosaic_prepare
        fn = lambda q, T_inv, g, v, S0: mosaic_prepare.prepare_T(q, g, g, doc_masks, t)
    elif mode == "reverse":
        fn = lambda q, T_inv, g, do, S0: ms.reverse_sweep(q, q, T_inv, g, g, doc_masks, do, S0, t, mode="full")
    else:
        fn = lambda q, T_inv, g, v, S0: ms.sweep(q, q, v, T_inv, g, g, doc_masks, S0, t, mode=mode,
                                                   out_dtype=BF16)
    lowered = jax.jit(fn).trace(q, T_inv, g, v, S0).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("segments, loop_stages, keep", [(1, 1, False), (2, 2, False), (1, 1, True),
                                                     (1, 3, "split")])
def test_triton_kernels_lower_for_gpu_at_the_paper_head_dims(triton_lowers_as_for_h100, segments,
                                                           loop_stages, keep):
    """Forward and backward at K = 200, V = 400 (the paper's heads) with GVA and documents lower to
    Triton for a GPU: every kernel, with the masked loads and stores at the true head dims (Triton
    refuses any tensor whose dims are not powers of two, so this is where a mask that widened a
    tile to the array's width would fail)."""
    B, T, H, HV, K, V = 1, 256, 1, 2, 200, 400
    q = jnp.zeros((B, T, H, K), BF16)
    v = jnp.zeros((B, T, HV, V), BF16)
    g = jnp.zeros((B, T, HV), jnp.float32)
    S0 = jnp.zeros((B, HV, K, V), jnp.float32)
    reset = jnp.zeros((B, T), bool).at[:, 70].set(True)

    def loss(q, k, v, g, beta, S0):
        o, S = pallas_gated_delta_rule(q, k, v, g, beta, scale=0.1, initial_state=S0, reset=reset,
                                       chunk_size=64, sweeps="triton", interpret=False, segments=segments,
                                       loop_stages=loop_stages, keep_residuals=keep is True,
                                       split_output=keep == "split")
        return o.astype(jnp.float32).sum() + S.sum()

    grad = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))  # the value keeps the forward
    text = grad.trace(q, q, v, g, g, S0).lower(lowering_platforms=("cuda",)).as_text()
    kernels = ["gdn_prepare", "gdn_local_dvnew", "gdn_reverse_sweep_full", "gdn_pair_grads", "gdn_key_grads"]
    kernels += {True: ["gdn_sweep_output_residuals"], "split": ["gdn_sweep_residuals", "gdn_output_from_states"],
                False: ["gdn_sweep_output", "gdn_sweep_residuals"]}[keep]
    if segments > 1:
        kernels += ["gdn_sweep_final", "gdn_reverse_sweep_final"]
    assert all(name in text for name in kernels), [name for name in kernels if name not in text]
    if keep is True:  # the backward sweeps once, not twice (split: counted in its own test)
        assert "gdn_sweep_residuals" not in text


def test_triton_path_copies_no_padded_q_k_v():
    """At K = 200, V = 400 the Triton path pads only the small state: no pad of q, k, v, dO (the
    kernels read them at their true widths); the padded copies were 0.25 ms of the paper layer's
    4.8 ms on an H200 (docs/benchmarks.md, run K)."""
    B, T, H, HV, K, V = 1, 128, 1, 1, 200, 400
    q, v = jnp.zeros((B, T, H, K), BF16), jnp.zeros((B, T, HV, V), BF16)
    g, S0 = jnp.zeros((B, T, HV), jnp.float32), jnp.zeros((B, HV, K, V), jnp.float32)

    def loss(q, k, v, g, beta, S0):
        o, S = pallas_gated_delta_rule(q, k, v, g, beta, scale=0.1, initial_state=S0, reset=None,
                                       chunk_size=64, sweeps="triton")
        return o.astype(jnp.float32).sum() + S.sum()

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=tuple(range(6))))(q, q, v, g, g, S0).jaxpr
    padded = [tuple(e.invars[0].aval.shape) for e in all_eqns(jaxpr) if e.primitive.name == "pad"]
    # Only states [B, HV, K', V'] (S0, and the gradient's transposes of its slice) are padded; q, k,
    # v, o and their cotangents are [B, T, heads, width].
    assert padded and all(len(s) == 4 and s[1] == HV and s[2] in (K, 256) for s in padded), padded


def test_pallas_on_hopper_follows_the_measured_preference(monkeypatch):
    """On a Hopper GPU "pallas" is Mosaic where it measured faster (K <= 128) and Triton elsewhere or
    where Mosaic cannot run the call (float32, chunk size 32)."""
    monkeypatch.setattr(impls, "on_hopper", lambda: True)
    runs = impls.IMPLEMENTATIONS["pallas_mosaic"]._replace(
        supports=lambda dtype, K, V, C: None if (jnp.dtype(dtype) == BF16 and C == 64) else "no")
    monkeypatch.setitem(impls.IMPLEMENTATIONS, "pallas_mosaic", runs)
    pick = lambda dtype, K, V, C: impls.resolve("pallas", dtype=dtype, K=K, V=V, chunk_size=C)
    assert pick(BF16, 128, 128, 64) == "pallas_mosaic"
    assert pick(BF16, 100, 80, 64) == "pallas_mosaic"
    assert pick(BF16, 200, 400, 64) == "pallas_triton"
    assert pick(BF16, 256, 512, 64) == "pallas_triton"
    assert pick(jnp.float32, 128, 128, 64) == "pallas_triton"
    assert pick(BF16, 128, 128, 32) == "pallas_triton"


def test_auto_is_pallas_on_a_gpu_for_16_bit_inputs_and_chunk_for_float32(monkeypatch):
    """ "auto" takes the Pallas kernels on a GPU for bf16/f16 inputs; float32 inputs (IEEE products,
    which Triton unrolls into FMA loops that compile for minutes at K = 256) take the chunk path,
    as every dtype does off the GPU. An explicit "pallas" still means the kernels."""
    monkeypatch.setattr(impls, "on_hopper", lambda: False)
    auto = lambda dtype: impls.resolve("auto", dtype=dtype, K=256, V=512, chunk_size=64)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert auto(BF16) == "pallas_triton" and auto(jnp.float16) == "pallas_triton"
    assert auto(jnp.float32) == "chunk"
    assert impls.resolve("pallas", dtype=jnp.float32, K=256, V=512, chunk_size=64) == "pallas_triton"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert auto(BF16) == "chunk" and auto(jnp.float32) == "chunk"


def test_measured_mosaic_defaults_apply_on_a_gpu_up_to_128():
    """The warp-specialised sweeps and the fused gradient kernel are the Mosaic defaults where they
    were measured to pay and fit (a GPU, padded K <= 128; V <= 128 for the fused kernel), and not in
    interpret mode or on the Triton sweeps."""
    from kernels_pallas.gated_delta_rule import _mosaic_on_gpu_up_to_128 as rule

    assert rule("mosaic", 128, 128, False) and rule("mosaic", 100, 80, False, values=True)
    assert rule("mosaic", 128, 256, False) and not rule("mosaic", 128, 256, False, values=True)
    assert not rule("mosaic", 256, 128, False)
    assert not rule("mosaic", 128, 128, True)
    assert not rule("triton", 128, 128, False)


def test_head_dims_pad_to_the_value_tiles_and_bad_tiles_are_named():
    """K pads to a power of two; V to a power of two up to 64 and to a multiple of 64 above (the
    paper's V = 400 runs as 448, not 512); value tiles that do not divide it are refused by name."""
    from kernels_pallas.gated_delta_rule import make_tiling, padded_head_dims

    assert padded_head_dims(200, 400) == (256, 448)
    assert padded_head_dims(100, 48) == (128, 64)
    assert padded_head_dims(128, 160) == (128, 192)
    assert padded_head_dims(64, 320) == (64, 320)
    assert padded_head_dims(8, 8) == (16, 16)
    kw = dict(B=1, T=128, H=1, HV=1, chunk_size=64, scale=0.1, has_docs=False, dtype=jnp.float32)
    t = make_tiling(K=128, V=320, **kw)
    assert (t.K, t.V, t.BV, t.BVI) == (128, 320, 32, 64)  # 128 does not divide 320: inner tile 64
    assert make_tiling(K=128, V=384, **kw).BVI == 128
    # The residual sweep's tile: 64 on Triton at K > 128 (one pipelining stage then fits), else block_v.
    t256 = make_tiling(K=256, V=448, **{**kw, "dtype": BF16})
    assert (t256.BV, t256.sweep_stages, t256.BVR, t256.residual_stages) == (32, 2, 64, 1)
    assert t256.residual_tiling.BV == 64 and t256.residual_tiling.sweep_stages == 1
    assert (t.BVR, t.residual_tiling.BV) == (32, 32)
    # Two pipelining stages only where they fit a Hopper's shared memory: the H200's answers in run L
    # (bf16, K = 256, BV = 32 fitted; a [C, C] tile more per stage did not), and so at float32 inputs
    # K = 256 gets one stage, as does K = 512.
    from kernels_pallas.gated_delta_rule import two_sweep_stages_fit
    assert two_sweep_stages_fit(C=64, K=256, BV=32, itemsize=2)
    assert not two_sweep_stages_fit(C=64 + 32, K=256, BV=32, itemsize=2)  # ~ the failed [C, C] tile
    assert make_tiling(K=256, V=448, **kw).sweep_stages == 1  # float32
    assert make_tiling(K=128, V=128, **kw).sweep_stages == 2
    assert make_tiling(K=512, V=64, block_v=16, **{**kw, "dtype": BF16}).sweep_stages == 1
    # The gradient kernels' value-tile loop: pipelined three deep where run M measured it (Triton
    # sweeps, K > 128, bf16: 3.319 -> 2.548 ms at fla1.3b), unrolled elsewhere unless asked.
    bf16 = {**kw, "dtype": BF16}
    assert make_tiling(K=256, V=512, **bf16).loop_stages == 3
    assert make_tiling(K=200, V=400, **bf16).loop_stages == 3
    assert make_tiling(K=256, V=512, **kw).loop_stages == 1  # float32: tiles twice the size
    assert make_tiling(K=128, V=128, **bf16).loop_stages == 1
    assert make_tiling(K=256, V=512, loop_stages=2, **bf16).loop_stages == 2
    assert make_tiling(K=256, V=512, **bf16).loop_launch["num_stages"] == 3
    for name, bad in (("block_v", dict(block_v=128)), ("inner_block_v", dict(inner_block_v=128)),
                      ("block_v", dict(block_v=48)), ("residual_block_v", dict(residual_block_v=128)),
                      ("loop_stages", dict(loop_stages=0))):
        with pytest.raises(ValueError, match=name):
            make_tiling(K=128, V=320, **bad, **kw)
