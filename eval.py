"""Evaluate a trained run: perplexity, S-NIAH-1/2/3, MQAR, length extrapolation, lm-eval tasks; or
sample text.

    python eval.py --workdir runs/tiny --tasks ppl,niah,mqar,extrapolation [--lengths 1024,2048,...]
    python eval.py --workdir runs/tiny --tasks ppl,lm_eval:piqa,lm_eval:hellaswag
    python eval.py --workdir runs/tiny --generate "def main(" --max_new_tokens 200 --temperature 0.8

Results go to WORKDIR/eval/results.json with PNG plots beside it (docs/evaluation.md has the schema).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

from gdn_jax.xla_flags import single_threaded_eigen_on_cpu

TASKS = ("ppl", "niah", "mqar", "extrapolation")
LM_EVAL = "lm_eval:"  # prefix of lm-evaluation-harness tasks (gdn_jax/lm_eval/tasks.py)


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, help="run directory written by train.py")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma list of {', '.join(TASKS)} and {LM_EVAL}NAME (an lm-eval task or group)",
    )
    p.add_argument("--out", default=None, help="output directory (default WORKDIR/eval)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic tasks")
    p.add_argument("--batch_size", type=int, default=8, help="rows per forward pass (ppl, mqar)")
    # Perplexity and extrapolation text.
    p.add_argument(
        "--data", default=None, help="text file to evaluate on (default: the run's held-out split)"
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="perplexity window, tokens (default: the training seq_len)",
    )
    p.add_argument(
        "--max_tokens",
        type=int,
        default=None,
        help="score at most this many tokens for perplexity (default: all)",
    )
    p.add_argument(
        "--extrapolation_len",
        type=int,
        default=None,
        help="sequence length for the extrapolation curve (default: 4x training seq_len)",
    )
    p.add_argument("--extrapolation_seqs", type=int, default=8, help="sequences averaged")
    # S-NIAH.
    p.add_argument(
        "--lengths",
        type=_ints,
        default=[1024, 2048, 4096, 8192],
        help="S-NIAH context lengths in tokens, comma list",
    )
    p.add_argument(
        "--depths",
        type=_floats,
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="S-NIAH needle depths in [0, 1], comma list",
    )
    p.add_argument("--niah_tasks", default="s_niah_1,s_niah_2,s_niah_3", help="comma list")
    p.add_argument("--niah_samples", type=int, default=4, help="samples per (length, depth) cell")
    p.add_argument("--niah_batch", type=int, default=10, help="prompts generated together")
    p.add_argument(
        "--haystack",
        default=None,
        help="text file of natural prose for S-NIAH-2/3 (default: docstring prose of the "
        "embedded held-out corpus)",
    )
    # MQAR.
    p.add_argument(
        "--mqar_kv_pairs",
        type=_ints,
        default=None,
        help="comma list (default: the run's, or 4,8,...,64 that fit)",
    )
    p.add_argument(
        "--mqar_seq_len",
        type=int,
        default=None,
        help="default: the run's seq_len for MQAR runs, else 256",
    )
    p.add_argument(
        "--mqar_vocab",
        type=int,
        default=None,
        help="default: the run's MQAR vocab, else min(8192, model vocab)",
    )
    p.add_argument("--mqar_examples", type=int, default=256, help="rows per kv-pairs setting")
    # Generation.
    p.add_argument(
        "--generate",
        default=None,
        metavar="PROMPT",
        help="print a sampled continuation of PROMPT instead of evaluating",
    )
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    # lm-eval tasks (--tasks lm_eval:NAME); batches take --batch_size rows.
    p.add_argument(
        "--lm_eval_include_path",
        default=None,
        help="directory of lm-eval task YAML files (local tasks, e.g. over JSONL files)",
    )
    p.add_argument(
        "--lm_eval_limit",
        type=float,
        default=None,
        help="documents per lm-eval task (a fraction if < 1); for quick checks",
    )
    p.add_argument("--lm_eval_num_fewshot", type=int, default=None, help="default: the task's")
    p.add_argument(
        "--lm_eval_max_length",
        type=int,
        default=None,
        help="tokens per forward pass (default 8192); longer requests continue through the "
        "model's recurrence",
    )
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASKS and not t.startswith(LM_EVAL)]
    if unknown:
        p.error(
            f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)} or "
            f"{LM_EVAL}NAME"
        )
    args.niah_tasks = [t.strip() for t in args.niah_tasks.split(",") if t.strip()]
    from gdn_jax.evaluate.niah import TASKS as NIAH_TASKS

    bad = [t for t in args.niah_tasks if t not in NIAH_TASKS]
    if bad:
        p.error(f"unknown S-NIAH task(s) {', '.join(bad)}; choose from {', '.join(NIAH_TASKS)}")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        p.error("--depths must lie in [0, 1]")
    return args


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    single_threaded_eigen_on_cpu()
    if not os.path.isdir(args.workdir):
        print(f"error: workdir {args.workdir!r} does not exist", file=sys.stderr)
        return 2
    from gdn_jax.evaluate import loading

    try:
        lm_eval_manager = lm_eval_task_index(args)
        run = loading.load_run(args.workdir, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(
        f"loaded {args.workdir} step {run.step}: {run.cfg.model.name}, "
        f"{run.num_params / 1e6:.2f}M params, tokenizer {run.tokenizer!r}"
    )

    if args.generate is not None:
        text = loading.sample_text(
            run,
            args.generate,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        print(args.generate + text)
        return 0

    out_dir = args.out or os.path.join(args.workdir, "eval")
    try:
        evaluate(run, args, out_dir, lm_eval_manager)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"wrote {os.path.join(out_dir, 'results.json')}")
    return 0


def lm_eval_task_index(args: argparse.Namespace):
    """lm-eval's task index when args.tasks has lm_eval:NAME tasks, else None; checked before the
    model loads, so a misspelt task fails at once. ValueError when lm-eval is missing or a task is
    unknown."""
    names = [t[len(LM_EVAL) :] for t in args.tasks if t.startswith(LM_EVAL)]
    if not names:
        return None
    try:
        from gdn_jax.lm_eval import tasks as lm_eval_tasks
    except ImportError as e:
        raise ValueError(f"{LM_EVAL} tasks need lm-eval: {e}") from None
    return lm_eval_tasks.task_manager(names, args.lm_eval_include_path)


def evaluate(run, args: argparse.Namespace, out_dir: str, lm_eval_manager=None) -> dict:
    """Runs args.tasks on a loaded run (gdn_jax.evaluate.loading.Run); writes results.json + plots.
    lm_eval_manager: lm_eval_task_index(args), needed when args.tasks has lm_eval:NAME tasks."""
    from gdn_jax.evaluate import loading, runner

    os.makedirs(out_dir, exist_ok=True)
    train_len = run.cfg.data.seq_len
    results = {
        "workdir": os.path.abspath(args.workdir),
        "step": run.step,
        "model": run.cfg.model.name,
        "num_params": run.num_params,
        "train_seq_len": train_len,
        "tokenizer": run.cfg.data.tokenizer,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": {},
    }
    needs_text = {"ppl", "extrapolation"} & set(args.tasks)
    nll_fn = runner.make_nll_fn(run.model) if needs_text else None
    docs = source = None
    if needs_text:
        docs, source = loading.heldout_token_docs(run, args.data)
    lm = None  # the lm-eval model, built at the first lm_eval: task

    for task in args.tasks:
        t0 = time.time()
        log(f"== {task}")
        if task == "ppl":
            results["ppl"] = runner.run_perplexity(
                nll_fn,
                docs,
                window=args.window or train_len,
                batch_size=args.batch_size,
                max_tokens=args.max_tokens,
                source=source,
                log=log,
            )
        elif task == "extrapolation":
            results["extrapolation"] = runner.run_extrapolation(
                nll_fn,
                docs,
                train_seq_len=train_len,
                seq_len=args.extrapolation_len or 4 * train_len,
                num_seqs=args.extrapolation_seqs,
                out_dir=out_dir,
                log=log,
            )
            results["extrapolation"]["source"] = source
        elif task == "mqar":
            seq_len, vocab, kv = loading.mqar_settings(run, args)
            results["mqar"] = runner.run_mqar(
                runner.make_argmax_fn(run.model),
                seq_len=seq_len,
                vocab_size=vocab,
                kv_pairs=kv,
                num_examples=args.mqar_examples,
                batch_size=args.batch_size,
                seed=args.seed + 10_000,
                out_dir=out_dir,
                log=log,
            )
        elif task == "niah":
            essay, essay_source = loading.haystack_text(args.haystack)
            results["niah"] = runner.run_niah(
                loading.make_generate_fn(run),
                run.tokenizer,
                tasks=args.niah_tasks,
                lengths=args.lengths,
                depths=args.depths,
                samples=args.niah_samples,
                batch_size=args.niah_batch,
                essay_text=essay,
                seed=args.seed,
                out_dir=out_dir,
                log=log,
                prefix_ids=loading.bos_prefix(run),
            )
            results["niah"]["haystack_source"] = essay_source
        elif task.startswith(LM_EVAL):
            from gdn_jax.lm_eval import tasks as lm_eval_tasks
            from gdn_jax.lm_eval.adapter import GdnJaxLM

            if lm is None:
                lm = GdnJaxLM(
                    run=run, batch_size=args.batch_size, max_length=args.lm_eval_max_length, log=log
                )
            name = task[len(LM_EVAL) :]
            try:
                out = lm_eval_tasks.run_task(
                    lm,
                    name,
                    lm_eval_manager,
                    limit=args.lm_eval_limit,
                    num_fewshot=args.lm_eval_num_fewshot,
                )
            except ConnectionError as e:  # `datasets` could not fetch the task's data set
                raise ValueError(
                    f"{task}: its data set downloads from the Hugging Face hub, which failed "
                    f"({e}); run where the hub is reachable, or use a local task "
                    f"(docs/evaluation.md)"
                ) from None
            results.setdefault("lm_eval", {})[name] = out
            for sub, metrics in out["results"].items():
                shown = {k: v for k, v in metrics.items() if "_stderr" not in k and k != "alias"}
                log(f"[{task}] {sub}: {shown}")
        results["seconds"][task] = round(time.time() - t0, 2)
        _write(results, out_dir)
    return results


def _write(results: dict, out_dir: str) -> None:
    def clean(x):  # JSON has no NaN/Inf: write null
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path = os.path.join(out_dir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(clean(results), f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
