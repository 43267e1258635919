"""Train a Gated DeltaNet LM.

    python train.py                                    # tiny config, embedded corpus, runs/tiny
    python train.py --config tiny_h1 --workdir runs/h1 --steps 500
    python train.py --config gdn_1.3b --set data.paths=/data/*.jsonl train.lr=3e-4
    python train.py --workdir runs/tiny                # resume (config read from DIR/config.json)
    python train.py --init_from runs/fla --workdir runs/ft   # fine-tune runs/fla's weights

Overrides: `--set section.field=value ...` (values parsed as JSON, else strings; tuples as
comma-separated lists); sections: model, data, train, mesh, run. Mesh axes: mesh.data, mesh.fsdp,
mesh.context (long sequences), mesh.tensor. Multi-host: --distributed=auto (Slurm / Open MPI / TPU
detection by jax.distributed), or --coordinator_address HOST:PORT --num_processes N --process_id I;
a checkpoint resumes on any number of processes. See docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gdn_jax.xla_flags import overlap_collectives, single_threaded_eigen_on_cpu  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config",
        default=None,
        help="preset name, a config JSON, or a workdir; default: DIR/config.json when "
        "resuming, else 'tiny'",
    )
    p.add_argument("--workdir", default=None, help="run directory (default runs/<config name>)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train until this global step (default train.steps); the LR schedule "
        "always spans train.steps",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config overrides, e.g. --set model.d_model=128 train.lr=1e-3",
    )
    p.add_argument(
        "--init_from",
        default=None,
        metavar="WORKDIR",
        help="start a new run from WORKDIR's params (its latest checkpoint, or --init_step) "
        "with a fresh optimiser at step 0; the config defaults to WORKDIR/config.json. "
        "Ignored once --workdir holds a checkpoint (the run resumes)",
    )
    p.add_argument("--init_step", type=int, default=None, help="checkpoint step of --init_from")
    p.add_argument(
        "--distributed",
        choices=("off", "auto", "manual"),
        default=None,
        help="multi-host start: off (default), auto (cluster detection), manual "
        "(implied by --coordinator_address)",
    )
    p.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    return p.parse_args(argv)


def resolve_config(args):
    from configs import experiment

    name = args.config
    if name is None:
        saved = args.workdir and os.path.exists(os.path.join(args.workdir, "config.json"))
        if saved:
            name = os.path.join(args.workdir, "config.json")
        elif args.init_from:
            name = os.path.join(args.init_from, "config.json")
        else:
            name = "tiny"
    cfg = experiment.apply_overrides(experiment.get_config(name), args.set)
    workdir = args.workdir or os.path.join("runs", cfg.name)
    return cfg, workdir


def main(argv=None, on_batch=None) -> int:
    """Runs the command line; on_batch as in gdn_jax.train.loop.train (for audits and tests)."""
    args = parse_args(argv)
    single_threaded_eigen_on_cpu()
    overlap_collectives()
    mode = args.distributed or ("manual" if args.coordinator_address else "off")
    # jax.distributed must start before anything touches a device.
    from gdn_jax.train import mesh as mesh_lib

    mesh_lib.initialize_distributed(
        mode, args.coordinator_address, args.num_processes, args.process_id
    )
    cfg, workdir = resolve_config(args)
    from gdn_jax.train import loop

    try:
        loop.train(cfg, workdir, stop_step=args.steps, init_from=args.init_from,
                   init_step=args.init_step, on_batch=on_batch)
    except loop.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
