"""Training throughput: tokens/s, MFU and peak memory of the real train step (AdamW, bf16 compute).

    python bench/train_throughput.py                          # fla_gdn_1.3b, B=4 x T=4096, 1 GPU
    python bench/train_throughput.py --config gdn_1.3b --remat none   # the preset's remat otherwise
    python bench/train_throughput.py --config tiny --batch 2 --seq 128 --steps 3   # CPU smoke run

Several GPUs: one process per GPU, e.g. on one 8-GPU host
    for i in $(seq 0 7); do CUDA_VISIBLE_DEVICES=$i python bench/train_throughput.py \\
        --coordinator_address localhost:1234 --num_processes 8 --process_id $i & done; wait
(or `srun python bench/train_throughput.py --distributed=auto` under Slurm), or one process that
sees all the GPUs. The mesh: --fsdp N (-1 or no value: all devices not taken by the other axes),
--context N (each sequence split over N devices), --tensor N; the devices left over are data
parallel. --batch is sequences per data-parallel shard (data x fsdp), so the global batch grows with
those axes; compare tokens/s per device with the 1-GPU run.

Collectives overlap computation through the XLA flags of gdn_jax/xla_flags.py, set here as in
train.py; --no_overlap_flags leaves them out (the step as before they existed). --grad_reduce_dtype
bfloat16 reduces gradients in bf16. --collectives prints the compiled step's collectives (count and
bytes per kind and dtype). --profile DIR traces 3 more steps and prints GPU time per op group, per model
scope (the model's jax.named_scope names: block/GatedDeltaNet/short_conv, loss, optimizer, ...,
forward and backward apart), the time with no GPU op running (with the longest gaps and the ops on
either side) and the exposed communication: collective kernel time during which no compute kernel
ran (bench/profile_summary.py).

Batches are random tokens (one document per row) already on the devices, so only the step is
timed. The steps are timed twice: each one synced (the host waits for its loss before dispatching
the next: "step time, each synced", the median), then dispatched as train.py's loop does, step i + 1
before step i's loss is read ("step time", the mean); tokens/s and MFU use the latter.
MFU = tokens/s x 6N / (devices x peak), N = parameter count, peak = 989 TFLOP/s bf16 dense
on H100/H200; "MFU (model FLOPs)" uses gdn_jax.model.flops_per_token (adds attention/recurrence work).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="fla_gdn_1.3b", help="model / experiment preset")
    p.add_argument("--batch", type=int, default=4, help="sequences per device per step")
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (params stay float32)")
    p.add_argument("--remat", default=None,
                   help="none or a remat policy of configs/model.py REMAT_POLICIES (dots_gdn, ...)")
    p.add_argument("--gdn_impl", default=None, help="scan | chunk | pallas | auto")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--fsdp", type=int, nargs="?", const=-1, default=1,
                   help="fsdp axis size (no value or -1: the devices the other axes leave)")
    p.add_argument("--context", type=int, default=1, help="context axis size (splits T)")
    p.add_argument("--tensor", type=int, default=1, help="tensor axis size")
    p.add_argument("--grad_reduce_dtype", default=None, help="float32 | bfloat16")
    p.add_argument("--no_overlap_flags", action="store_true",
                   help="leave out gdn_jax/xla_flags.py's collective-overlap flags")
    p.add_argument("--collectives", action="store_true",
                   help="print the compiled step's collectives (count, bytes)")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides, as in train.py")
    p.add_argument("--launch", nargs="*", default=[], metavar="KEY=INT",
                   help="Pallas launch parameters for every GDN kernel call, e.g. split_output=0 "
                        "(kernels_pallas.launch_defaults)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, trace 3 more steps into DIR and print GPU time per op group")
    p.add_argument("--distributed", choices=("off", "auto", "manual"), default=None)
    p.add_argument("--coordinator_address", default=None)
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    args = p.parse_args()

    from gdn_jax.xla_flags import overlap_collectives, single_threaded_eigen_on_cpu

    single_threaded_eigen_on_cpu()
    if not args.no_overlap_flags:
        overlap_collectives()
    from gdn_jax.train import mesh as mesh_lib

    mode = args.distributed or ("manual" if args.coordinator_address else "off")
    mesh_lib.initialize_distributed(
        mode, args.coordinator_address, args.num_processes, args.process_id
    )

    import jax
    import numpy as np
    from configs import experiment
    from gdn_jax.model import count_params, flops_per_token
    from gdn_jax.train import metrics as metrics_lib
    from gdn_jax.train import step as step_lib

    n_dev = jax.device_count()
    mesh_overrides = [f"mesh.data={1 if args.fsdp == -1 else -1}", f"mesh.fsdp={args.fsdp}",
                      f"mesh.context={args.context}", f"mesh.tensor={args.tensor}"]
    base = experiment.apply_overrides(experiment.get_config(args.config), mesh_overrides)
    shape = dict(zip(mesh_lib.MESH_AXES, mesh_lib.mesh_shape(base.mesh, n_dev)))
    G = args.batch * shape["data"] * shape["fsdp"]
    overrides = mesh_overrides + [
        f"model.dtype={args.dtype}",
        f"data.seq_len={args.seq}",
        f"train.global_batch={G}",
        f"train.microbatches={args.microbatches}",
    ]
    if args.remat:
        overrides.append(f"model.remat={args.remat}")
    if args.gdn_impl:
        overrides.append(f"model.gdn_impl={args.gdn_impl}")
    if args.grad_reduce_dtype:
        overrides.append(f"train.grad_reduce_dtype={args.grad_reduce_dtype}")
    cfg = experiment.apply_overrides(experiment.get_config(args.config), overrides + args.set)
    mesh_lib.check_config(cfg, n_dev)
    from kernels_pallas import launch_defaults

    launch = {}
    for item in args.launch:
        key, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise SystemExit(f"--launch takes KEY=INT, got {item!r}")
        launch[key] = int(value)
    # Open for the rest of main: the step is traced at its first call. (Entered without a reference
    # kept, the context manager would be collected at once and its exit undo the defaults.)
    scopes = contextlib.ExitStack()
    scopes.enter_context(launch_defaults(**launch))
    mesh = mesh_lib.make_mesh(cfg.mesh)
    trainer = step_lib.build(cfg, mesh)
    state, rest = trainer.init_fn(), trainer.rest_fn()

    rows = mesh_lib.local_rows(mesh, G, args.seq)
    shape = (len(rows), args.seq)
    # Each global row's tokens depend only on its index, so any mesh and process count trains on the
    # same batch (a context-parallel run's loss can be compared with one GPU's).
    tokens = np.stack([np.random.default_rng(r).integers(0, cfg.model.vocab_size, size=args.seq + 1,
                                                         dtype=np.int32) for r in rows])
    local = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones(shape, np.float32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), shape).copy(),
    }
    batch = mesh_lib.global_batch_array(local, mesh, G)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import profile_summary

    if args.collectives and jax.process_index() == 0:
        text = trainer.lower_fn(state, rest, batch).compile().as_text()
        print(profile_summary.collectives_table(profile_summary.hlo_collectives(text)))

    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, m = trainer.step_fn(state, rest, batch)
        loss = float(m["loss"])  # blocks: the step is done
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    # As train.py's loop runs: step i + 1 is dispatched before step i's metrics are fetched, so the
    # GPU does not wait on the host between steps. Tokens/s and MFU come from this time.
    t0 = time.perf_counter()
    pending = None
    for _ in range(args.steps):
        state, m = trainer.step_fn(state, rest, batch)
        if pending is not None:
            float(pending["loss"])
        pending = m
    loss = float(pending["loss"])
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = G * args.seq / dt
    n = count_params(cfg.model)
    peak = metrics_lib.peak_flops(jax.devices()[0])
    stats = jax.local_devices()[0].memory_stats() or {}
    if jax.process_index() == 0:
        print(
            f"config {cfg.name} | {n / 1e6:,.1f}M params | {n_dev} x {jax.devices()[0].device_kind} | "
            f"mesh {dict(mesh.shape)} | batch {G} x {args.seq} | dtype {cfg.model.dtype} | "
            f"remat {cfg.model.remat} | gdn_impl {cfg.model.gdn_impl} | grads reduced in "
            f"{cfg.train.grad_reduce_dtype} | overlap flags {'off' if args.no_overlap_flags else 'on'}"
            f"{' | launch ' + str(launch) if launch else ''}"
        )
        print(f"{'step time':<24}{dt * 1e3:10.1f} ms   (mean of {args.steps} steps dispatched as "
              f"train.py does, one step ahead of the host)")
        print(
            f"{'step time, each synced':<24}{statistics.median(times) * 1e3:10.1f} ms   (median; min "
            f"{min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, {len(times)} steps)"
        )
        print(f"{'tokens/s':<24}{tok_s:10,.0f}   ({tok_s / n_dev:,.0f} per device)")
        if peak:
            print(f"{'MFU (6N)':<24}{100 * tok_s * 6 * n / (n_dev * peak):10.1f} %")
            print(
                f"{'MFU (model FLOPs)':<24}"
                f"{100 * tok_s * flops_per_token(cfg.model, args.seq) / (n_dev * peak):10.1f} %"
            )
        else:
            print(f"{'MFU':<24}{'n/a':>10}   (no peak FLOP/s for {jax.devices()[0].device_kind})")
        if "peak_bytes_in_use" in stats:
            limit = stats.get("bytes_limit", 0) / 2**30
            print(f"{'peak memory':<24}{stats['peak_bytes_in_use'] / 2**30:10.2f} GiB (device 0, "
                  f"of {limit:.2f} GiB)")
        else:
            print(f"{'peak memory':<24}{'n/a':>10}")
        print(f"{'last loss':<24}{loss:10.4f}")
    if args.profile:
        with jax.profiler.trace(args.profile):
            for _ in range(3):
                state, m = trainer.step_fn(state, rest, batch)
            jax.block_until_ready(m["loss"])
        if jax.process_index() == 0:
            # The op names of the compiled step lead each profiled op to its jax.named_scope.
            text = trainer.lower_fn(state, rest, batch).compile().as_text()
            # Kept beside the trace, so the trace can be read again elsewhere with its op names.
            with open(os.path.join(args.profile, "train_step.hlo.txt"), "w") as f:
                f.write(text)
            print(profile_summary.summarize(args.profile, steps=3, step_ms=dt * 1e3, hlo_text=text))


if __name__ == "__main__":
    main()
