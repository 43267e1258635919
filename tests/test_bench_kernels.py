"""bench/bench_kernels.py, the script every kernel measurement goes through: its variant names map to
the launch parameters they say, and its per-kernel breakdown runs (interpret mode, the tiny shape),
so a device call is not spent finding a script error."""

import ast
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import bench_kernels  # noqa: E402


def test_variant_names_map_to_launch_parameters():
    parsed = dict(bench_kernels.parse_variants("mosaic-tkgrw1,triton-bvr64ls2kr1,mosaic-fkg,triton"))
    assert parsed["mosaic-tkgrw1"] == {"sweeps": "mosaic", "key_grads": "triton", "reverse_warpgroups": 1}
    assert parsed["triton-bvr64ls2kr1"] == {"sweeps": "triton", "residual_block_v": 64, "loop_stages": 2,
                                            "keep_residuals": 1}
    assert parsed["mosaic-fkg"] == {"sweeps": "mosaic", "key_grads": "fused"}
    assert parsed["triton"] == {"sweeps": "triton"}
    assert dict(bench_kernels.parse_variants("triton-so1"))["triton-so1"] == {"sweeps": "triton", "split_output": 1}
    with pytest.raises(SystemExit):
        bench_kernels.parse_variants("triton-zz3")


def test_breakdown_times_every_kernel_of_each_variant(capsys, tmp_path):
    bench_kernels.main(["--shapes", "tiny", "--iters", "1", "--no-fla", "--no-chunk", "--no-check",
                        "--breakdown-only", "--variants", "triton,triton-kr1,triton-so1", "--out", str(tmp_path)])
    rows = {line.split(" breakdown ms: ")[0]: ast.literal_eval(line.split(" breakdown ms: ")[1])
            for line in capsys.readouterr().out.splitlines() if " breakdown ms: " in line}
    assert set(rows) == {"tiny triton", "tiny triton-kr1", "tiny triton-so1"}
    assert {"sweep residuals (kept)", "output from states"} <= set(rows["tiny triton-so1"])
    assert "sweep output" not in rows["tiny triton-so1"]
    assert {"sweep output", "sweep residuals", "reverse sweep", "key grads"} <= set(rows["tiny triton"])
    assert "sweep output + residuals (kept)" in rows["tiny triton-kr1"]
    assert "sweep residuals" not in rows["tiny triton-kr1"]
    assert all(ms > 0 for row in rows.values() for ms in row.values())


def test_forward_backward_returns_the_output_with_the_gradients():
    """The timed forward+backward must return o and S: when it returned only the gradients, XLA
    dropped the forward's output sweep as dead code and the times lacked it (2026-12-04)."""
    import jax
    import jax.numpy as jnp

    args, dO = bench_kernels.make_inputs(bench_kernels.SMOKE["tiny"], dtype=jnp.float32)
    fwd, fwd_bwd = bench_kernels.fwd_and_grad(bench_kernels.chunk_fn, dO)
    o, S, grads = fwd_bwd(*args)
    o_ref, S_ref = jax.jit(bench_kernels.chunk_fn)(*args)
    assert jnp.allclose(o, o_ref, rtol=1e-5, atol=1e-5) and jnp.allclose(S, S_ref, rtol=1e-5, atol=1e-5)
    assert jnp.allclose(fwd(*args), o_ref, rtol=1e-5, atol=1e-5)

    def loss(*a):
        o, S = bench_kernels.chunk_fn(*a)
        return jnp.vdot(o, dO) + 1e-3 * jnp.sum(S)
    expected = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
    for got, want in zip(grads, expected):
        assert jnp.allclose(got, want, rtol=1e-4, atol=1e-5)
