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
