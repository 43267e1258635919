"""bench/profile_summary.py: exposed communication from kernel timelines, collectives from HLO."""

import os
import sys
from types import SimpleNamespace as NS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import profile_summary  # noqa: E402


def test_exposed_time_counts_communication_no_computation_covers():
    # Communication 0-10 and 20-30; computation 2-4, 3-6 (overlapping) and 25-40.
    total, exposed = profile_summary.exposed_time([(20, 30), (0, 10)], [(25, 40), (2, 4), (3, 6)])
    assert total == 20 and exposed == 20 - 4 - 5
    assert profile_summary.exposed_time([(0, 5)], []) == (5, 5)
    assert profile_summary.exposed_time([], [(0, 5)]) == (0, 0)


def test_communication_times_read_every_stream_of_a_gpu():
    ev = lambda name, start, dur: NS(name=name, start_ns=start, duration_ns=dur)
    plane = NS(name="/device:GPU:0", lines=[
        NS(name="XLA Ops", events=[ev("all-reduce-start", 0, 9e6)]),  # not a kernel timeline
        NS(name="Stream #13(Compute)", events=[ev("loop_fusion", 0, 4e6), ev("gemm", 6e6, 1e6)]),
        NS(name="Stream #20(Nccl)", events=[ev("ncclDevKernel_AllReduce_Sum_bf16", 2e6, 6e6)]),
    ])
    assert profile_summary.communication_times([plane]) == [(6.0, 3.0)]  # 4-6 and 7-8 exposed


def test_hlo_collectives_sum_arrays_by_kind_and_dtype():
    hlo = """
  %all-gather-start = (f32[32,64]{1,0}, f32[64,64]{1,0}) all-gather-start(%p), dimensions={0}
  %all-gather-done = f32[64,64]{1,0} all-gather-done(%all-gather-start)
  %reduce-scatter.3 = bf16[32,64]{1,0} reduce-scatter(%g), dimensions={0}, to_apply=%add
  %all-reduce.1 = (f32[], /*index=1*/bf16[8]{0}) all-reduce(%a, %b), to_apply=%add
"""
    got = profile_summary.hlo_collectives(hlo)
    assert got == {("all-gather", "f32"): (2, (32 * 64 + 64 * 64) * 4),
                   ("all-reduce", "bf16"): (1, 16), ("all-reduce", "f32"): (1, 4),
                   ("reduce-scatter", "bf16"): (1, 32 * 64 * 2)}
    assert "reduce-scatter" in profile_summary.collectives_table(got)


def test_scope_of_strips_transformations_and_marks_the_backward():
    s = profile_summary.scope_of
    assert s("jit(step)/transpose(jvp(block))/mlp/dot_general") == "block/mlp (bwd)"
    assert s("jit(step)/jvp(GatedDeltaNet)/while/body/short_conv/add") == "GatedDeltaNet/short_conv"
    assert s("jit(f)/jvp(a)/b/c/...rk,...jk->...rj/dot_general", depth=3) == "a/b/c"
    assert s("jit(f)/jit(dynamic_slice)/dynamic_slice") == "(no scope)"


def test_scope_table_places_a_real_train_steps_ops_in_the_model():
    """The op names of a compiled tiny training step (loss, backward, AdamW) lead to the model's
    named scopes, and the table splits the time of made-up profile entries by them."""
    import re

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from configs.model import get_model_config
    from gdn_jax import losses
    from gdn_jax.model import LM

    graphdef, params = nnx.split(LM(get_model_config("tiny"), rngs=nnx.Rngs(0)))
    tx = optax.adamw(1e-3)

    def step(params, opt, x):
        grads = jax.grad(lambda p: losses.fused_lm_loss_sum(
            nnx.merge(graphdef, p), x, x, jnp.ones(x.shape), {}, chunk_tokens=64))(params)
        with jax.named_scope("optimizer"):
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt

    x = jnp.zeros((2, 64), jnp.int32)
    text = jax.jit(step).lower(params, tx.init(params), x).compile().as_text()
    names = profile_summary.hlo_op_names(text)
    scopes = {profile_summary.scope_of(op) for op in names.values()}
    for want in ("GatedDeltaNet/in_proj", "GatedDeltaNet/gated_delta_rule (bwd)", "mlp (bwd)",
                 "mixer_norm", "loss", "optimizer"):
        assert want in scopes, (want, sorted(scopes))
    fusion = next(n for n, op in names.items() if profile_summary.scope_of(op) == "mlp (bwd)"
                  and not op.endswith("dot_general"))
    dot = next(n for n, op in names.items() if op.endswith("dot_general")
               and profile_summary.scope_of(op) == "GatedDeltaNet/in_proj")
    table = profile_summary.scope_table({fusion: 6.0, dot: 3.0, "unknown.1": 1.0}, names, steps=2)
    rows = {}
    for line in table.splitlines()[1:]:
        *scope, mm, other, share, _ = line.split()
        rows[" ".join(scope)] = (float(mm), float(other), float(share))
    assert rows == {"mlp (bwd)": (0.0, 3.0, 60.0), "GatedDeltaNet/in_proj": (1.5, 0.0, 30.0),
                    "(not in the HLO)": (0.0, 0.5, 10.0)}


def test_op_times_and_count_read_the_xla_ops_line(monkeypatch):
    ev = lambda name, dur: NS(name=name, start_ns=0, duration_ns=dur)
    plane = NS(name="/device:GPU:0", lines=[
        NS(name="XLA Ops", events=[ev("fusion.1", 2e6), ev("gemm", 1e6), ev("fusion.1", 3e6)]),
        NS(name="Stream #13(Compute)", events=[ev("loop_fusion", 4e6)]),  # the same work, not counted
    ])
    monkeypatch.setattr(profile_summary, "_gpu_planes", lambda trace_dir: [plane])
    assert profile_summary.op_times("unused") == {"fusion.1": 5.0, "gemm": 1.0}
    assert profile_summary.op_count("unused") == 3
    assert "3 GPU ops per step" in profile_summary.summarize("unused", steps=1)


def test_scopes_follow_the_kernels_hlo_op_stat(monkeypatch):
    """Kernel events are named by their kernels (a cuBLAS nvjet_..., a fusion's name with "_" for
    "."); their "hlo_op" stat names the instruction, which is what the HLO text's metadata maps."""
    ev = lambda name, dur, hlo: NS(name=name, start_ns=0, duration_ns=dur, stats=[("hlo_op", hlo)])
    plane = NS(name="/device:GPU:0", lines=[NS(name="Stream #13(Compute)", events=[
        ev("nvjet_sm90_tst_128x128", 4e6, "custom-call.3"),
        ev("loop_add_fusion_21", 1e6, "loop_add_fusion.21"),
        NS(name="no_stats_kernel", start_ns=0, duration_ns=5e6),
    ])])
    monkeypatch.setattr(profile_summary, "_gpu_planes", lambda trace_dir: [plane])
    assert profile_summary.op_times_by_hlo_op("unused") == {
        "custom-call.3": 4.0, "loop_add_fusion.21": 1.0, "no_stats_kernel": 5.0}
    text = ('  %custom-call.3 = bf16[8,8]{1,0} custom-call(%a, %b), custom_call_target="__cublas$lt'
            '$matmul", metadata={op_name="jit(step)/transpose(jvp(block))/mlp/dot_general"}\n'
            '  %loop_add_fusion.21 = f32[8]{0} fusion(%c), kind=kLoop, calls=%fused_add, '
            'metadata={op_name="jit(step)/jvp(block)/norm/add"}\n')
    table = profile_summary.summarize("unused", steps=1, hlo_text=text)
    rows = {}
    for line in table.split("by scope")[1].splitlines()[1:]:
        if line.startswith("communication"):
            break
        *scope, mm, other, share, _ = line.split()
        rows[" ".join(scope)] = (float(mm), float(other), float(share))
    assert rows == {"(not in the HLO)": (0.0, 5.0, 50.0), "block/mlp (bwd)": (4.0, 0.0, 40.0),
                    "block/norm": (0.0, 1.0, 10.0)}


def test_kernels_in_a_command_buffer_are_placed_by_their_kernel_names(monkeypatch):
    """Inside a CUDA graph every kernel's "hlo_op" stat is the command buffer's instruction; a fusion
    kernel is then placed by its own name ("_" for "."), and a cuBLAS kernel stays unplaced."""
    ev = lambda name, dur: NS(name=name, start_ns=0, duration_ns=dur,
                              stats=[("hlo_op", "command_buffer_1")])
    plane = NS(name="/device:GPU:0", lines=[NS(name="Stream #14(Compute,Memset)", events=[
        ev("input_add_reduce_slice_fusion_1", 3e6), ev("nvjet_sm90_tst_128x128", 1e6)])])
    monkeypatch.setattr(profile_summary, "_gpu_planes", lambda trace_dir: [plane])
    text = ('  %input_add_reduce_slice_fusion.1 = (f32[4,8]{1,0}) fusion(%c), kind=kInput, '
            'metadata={op_name="jit(step)/transpose(jvp(block))/short_conv/mul"}\n')
    table = profile_summary.summarize("unused", steps=1, hlo_text=text).split("by scope")[1]
    assert "block/short_conv (bwd)" in table and "75.0 %" in table.split("short_conv (bwd)")[1]
    assert "(not in the HLO)" in table and "25.0 %" in table.split("(not in the HLO)")[1]


def test_idle_gaps_count_time_with_no_op_and_name_the_longest():
    ev = lambda name, start, dur: NS(name=name, start_ns=start, duration_ns=dur,
                                     stats=[("hlo_op", name + ".0")])
    events = [ev("c", 200e3, 10e3), ev("a", 0, 100e3), ev("b", 50e3, 100e3),  # a, b overlap
              ev("d", 215e3, 5e3)]
    idle, gaps = profile_summary.idle_gaps(events, min_ns=20e3)
    assert idle == 50e3 + 5e3  # 150-200 and 210-215 us
    assert gaps == [(50e3, "b.0", "c.0")]  # the 5 us gap is under min_ns
