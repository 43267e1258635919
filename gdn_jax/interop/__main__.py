"""Convert between FLA checkpoint directories and train.py workdirs.

    python3 -m gdn_jax.interop import-fla SRC_DIR --workdir DIR [--config PRESET] [--set a.b=v ...]
    python3 -m gdn_jax.interop export-fla --workdir DIR OUT_DIR [--step N] [--dtype bfloat16]

import-fla writes a workdir that eval.py evaluates and train.py fine-tunes (fresh optimiser);
export-fla writes a directory FLA's AutoModelForCausalLM.from_pretrained loads. docs/interop.md.
"""

from __future__ import annotations

import argparse
import sys


def _size(text: str) -> int:
    """'200MB', '5GB', '4096' -> bytes (decimal units, as transformers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m gdn_jax.interop", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-fla", help="FLA checkpoint directory -> train.py workdir")
    imp.add_argument("src", metavar="SRC_DIR", help="directory with config.json + safetensors")
    imp.add_argument("--workdir", required=True, help="workdir to write")
    imp.add_argument("--config", default=None,
                     help="preset or config JSON giving the data/train/mesh/run sections "
                          "(default: fine-tuning defaults, seq_len = max_position_embeddings)")
    imp.add_argument("--set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                     help="config overrides as in train.py (model: runtime fields only)")
    imp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="compute dtype of the model (params stay float32)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing workdir's "
                     "config and checkpoints")
    exp = sub.add_parser("export-fla", help="train.py workdir -> FLA checkpoint directory")
    exp.add_argument("--workdir", required=True, help="train.py workdir")
    exp.add_argument("out", metavar="OUT_DIR")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    exp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="dtype of the tensors on disk")
    exp.add_argument("--max_shard_size", type=_size, default=None,
                     help="shard the safetensors, e.g. 5GB (default: one file)")
    exp.add_argument("--overwrite", action="store_true", help="replace a checkpoint in OUT_DIR")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gdn_jax.interop import workdir

    try:
        if args.command == "import-fla":
            cfg = workdir.import_fla(args.src, args.workdir, config=args.config,
                                     overrides=args.set, dtype=args.dtype,
                                     overwrite=args.overwrite)
            m = cfg.model
            print(f"imported {args.src} -> {args.workdir}: {m.num_layers} layers "
                  f"({m.mixers}), d_model {m.d_model}, vocab {m.vocab_size}, tokenizer "
                  f"{cfg.data.tokenizer}")
        else:
            files = workdir.export_fla(args.workdir, args.out, step=args.step, dtype=args.dtype,
                                       max_shard_bytes=args.max_shard_size,
                                       overwrite=args.overwrite)
            print(f"exported {args.workdir} -> {args.out}: {', '.join(files)}")
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
