"""lm-eval's command line with the gdn_jax model registered.

    python3 -m gdn_jax.lm_eval --workdir runs/tiny --tasks piqa,hellaswag --batch_size 16
    python3 -m gdn_jax.lm_eval --workdir runs/tiny --tasks my_task --include_path tasks/ --limit 100
    python3 -m gdn_jax.lm_eval --workdir runs/tiny --tasks piqa --output_path out/ --log_samples
    python3 -m gdn_jax.lm_eval --model gdn_jax --model_args workdir=runs/tiny,dtype=float32 ...

Every option of `lm_eval` (`lm-eval run --help`) works as there. `--workdir DIR` stands for
`--model gdn_jax --model_args workdir=DIR`; a later --model_args adds or overrides keys (step,
dtype, max_length, max_gen_toks, seed: gdn_jax/lm_eval/adapter.py). Plain `lm_eval --model gdn_jax`
does not find the model: lm-eval 0.4 discovers no plug-ins, so the registration must run in the
same process, as it does here.
"""

from __future__ import annotations

import argparse
import sys

from gdn_jax.xla_flags import single_threaded_eigen_on_cpu


def lm_eval_argv(argv: list[str]) -> list[str]:
    """Our arguments -> `lm-eval run` arguments."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--workdir", default=None)
    ours, rest = p.parse_known_args(argv)
    if rest and rest[0] == "run":
        rest = rest[1:]
    head = ["run"]
    if ours.workdir is not None:
        if "--model" not in rest and "-M" not in rest:
            head += ["--model", "gdn_jax"]
        head += ["--model_args", f"workdir={ours.workdir}"]
    return head + rest


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    single_threaded_eigen_on_cpu()  # before JAX starts its CPU backend (see xla_flags.py)
    import gdn_jax.lm_eval  # noqa: F401  (registers the model)
    from lm_eval.__main__ import cli_evaluate

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        argv = ["run", "--help"]
    saved = sys.argv
    sys.argv = ["lm-eval", *lm_eval_argv(argv)]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
