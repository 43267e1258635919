"""lm-eval on a trained run: requests/s of the gdn_jax model on real local tasks, and agreement with
FLA's PyTorch model through lm-eval's `hf` backend.

    python3 bench/lm_eval_check.py --workdir runs/tiny --out lm_eval_check.json
    python3 bench/lm_eval_check.py --workdir runs/tiny --hf --out lm_eval_check.json   # + FLA

The tasks are built here, offline, from the embedded corpus's held-out files (Python source that
train.py never trains on), and written to --tasks_dir as YAML over JSONL:
  stdlib_next_line  multiple choice: the next line of a file, after up to 1000 characters of it,
                    among 4 (3 lines of other files of similar length); acc
  stdlib_complete   generate_until: the same line, greedy until "\\n"; exact match
  stdlib_ppl        loglikelihood_rolling over the first 4000 characters of each file
With --hf the run is exported with export-fla (float32), given a tokenizer.json that encodes as the
run's tokenizer does (for byte-tokenizer runs: a byte-level BPE with no merges, id = byte), and
lm-eval's hf backend (PyTorch, transformers, FLA's kernels: --hf_fla_mode, exact float32 by default)
runs the same tasks. Both sides compute in float32 with a window of --hf_max_length tokens (so neither cuts a context, and rolling windows
match: rolling_window on our side). Agreement: max |log p ours - log p hf| per request type, and the
fraction of equal greedy flags and generations. Prints a summary; --out writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to PyTorch too
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local tasks only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASKS = ("stdlib_next_line", "stdlib_complete", "stdlib_ppl")


# --------------------------------------------------------------------------------------- tasks


def _lines(text: str) -> list[tuple[int, str]]:
    """(offset, line) of lines worth predicting: at most 80 characters, at least 10 of them not
    indentation, not a comment."""
    out, pos = [], 0
    for line in text.split("\n"):
        body = line.strip()
        if len(line) <= 80 and len(body) >= 10 and not body.startswith("#"):
            out.append((pos, line))
        pos += len(line) + 1
    return out


def build_tasks(tasks_dir: str, num_lines: int, num_files: int, seed: int = 0) -> dict:
    """Writes the three tasks; returns the number of documents of each."""
    from gdn_jax.data.corpus import embedded_documents

    docs = embedded_documents("heldout")
    r = random.Random(seed)
    spots = [(d, off, line) for d, text in enumerate(docs) for off, line in _lines(text)
             if off >= 200]
    r.shuffle(spots)
    by_len: dict[int, list[tuple[int, str]]] = {}
    for d, _, line in spots:
        by_len.setdefault(len(line) // 10, []).append((d, line))
    rows = []
    for d, off, line in spots[:num_lines]:
        context = docs[d][max(0, off - 1000):off]
        context = context[context.index("\n") + 1:] if off > 1000 else context
        pool = sorted({x[1] for x in by_len[len(line) // 10] if x[0] != d and x[1] != line})
        choices = [line] + r.sample(pool, 3)
        r.shuffle(choices)
        rows.append({"context": context, "target": line, "choices": choices,
                     "label": choices.index(line)})
    files = [{"text": t[:4000]} for t in docs[:num_files]]
    os.makedirs(tasks_dir, exist_ok=True)
    common = {"dataset_path": "json", "test_split": "test"}
    specs = {
        "stdlib_next_line": (rows, dict(
            output_type="multiple_choice", doc_to_text="{{context}}", target_delimiter="",
            doc_to_target="label", doc_to_choice="choices", metric_list=[{"metric": "acc"}])),
        "stdlib_complete": (rows, dict(
            output_type="generate_until", doc_to_text="{{context}}", doc_to_target="{{target}}",
            generation_kwargs={"until": ["\n"], "max_gen_toks": 96},
            metric_list=[{"metric": "exact_match"}])),
        "stdlib_ppl": (files, dict(
            output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
            metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}])),
    }
    for name, (data, spec) in specs.items():
        path = os.path.join(os.path.abspath(tasks_dir), f"{name}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in data)
        with open(os.path.join(tasks_dir, f"{name}.yaml"), "w") as f:  # JSON is YAML
            json.dump({"task": name, **common, "dataset_kwargs": {"data_files": {"test": path}},
                       **spec}, f, indent=1)
    return {"stdlib_next_line": len(rows), "stdlib_complete": len(rows),
            "stdlib_ppl": len(files)}


# ------------------------------------------------------------------------------------ running


def evaluate(lm, tasks_dir: str, limit) -> tuple[dict, dict]:
    """simple_evaluate on the three tasks, timing each request type of `lm`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    times = {}
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        def timed(requests, *a, _method=getattr(lm, name), _name=name, **k):
            t0 = time.perf_counter()
            out = _method(requests, *a, **k)
            seconds = time.perf_counter() - t0
            times[_name] = {"requests": len(requests), "seconds": round(seconds, 3),
                            "requests_per_s": round(len(requests) / seconds, 2)}
            return out

        setattr(lm, name, timed)  # the instance attribute shadows the method
    manager = TaskManager(include_path=tasks_dir, include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager,
                                  log_samples=True, bootstrap_iters=0, limit=limit)
    return out, times


def byte_tokenizer_files(out_dir: str) -> None:
    """tokenizer.json + tokenizer_config.json encoding as gdn_jax's ByteTokenizer: byte b -> id b
    (a byte-level BPE without merges), <s> = 256 and </s> = 257, <s> added in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_char = {b: c for b, c in zip(range(256), _byte_level_order(alphabet))}
    tok = Tokenizer(models.BPE(vocab={byte_char[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", 256)])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>", "model_max_length": 1 << 20}, f)


def _byte_level_order(alphabet) -> list[str]:
    """The ByteLevel pre-tokenizer's character for each byte 0..255 (GPT-2's byte_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    assert set(chars.values()) == set(alphabet)
    return [chars[b] for b in range(256)]


def agreement(ours: dict, hf: dict) -> dict:
    """Per task: max |Δ log p| over requests, equal greedy flags, equal generations."""
    out = {}
    for task in TASKS:
        a = {s["doc_id"]: s for s in ours["samples"][task]}
        b = {s["doc_id"]: s for s in hf["samples"][task]}
        pairs = [(a[k]["resps"], b[k]["resps"]) for k in a]
        if task == "stdlib_complete":
            same = [x[0][0] == y[0][0] for x, y in pairs]
            out[task] = {"equal_generations": sum(same) / len(same)}
            continue
        flat = [(u, v) for x, y in pairs for u, v in zip(x, y)]
        if task == "stdlib_ppl":
            diffs = [abs(u[0] - v[0]) for u, v in flat]
            out[task] = {"max_abs_logp_diff": max(diffs),
                         "max_rel_logp_diff": max(d / abs(v[0]) for d, (_, v) in zip(diffs, flat))}
        else:
            diffs = [abs(u[0][0] - v[0][0]) for u, v in flat]
            out[task] = {"max_abs_logp_diff": max(diffs),
                         "equal_greedy_flags": sum(u[0][1] == v[0][1] for u, v in flat) / len(flat),
                         "equal_predictions": sum(
                             x_acc == y_acc for x_acc, y_acc in zip(
                                 [a[k]["acc"] for k in a], [b[k]["acc"] for k in a])) / len(a)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--dtype", default=None, help="ours (default: the run's; float32 with --hf)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lines", type=int, default=500, help="documents of the line tasks")
    p.add_argument("--files", type=int, default=20, help="documents of stdlib_ppl")
    p.add_argument("--limit", type=int, default=None, help="lm-eval --limit, for a smoke run")
    p.add_argument("--tasks_dir", default=None, help="default: a temporary directory")
    p.add_argument("--hf", action="store_true", help="also FLA through lm-eval's hf backend")
    p.add_argument("--hf_batch_size", type=int, default=16)
    p.add_argument("--hf_max_length", type=int, default=4096)
    p.add_argument("--hf_fla_mode", default="fused_recurrent", choices=("fused_recurrent", "chunk"),
                   help="FLA's kernel in the hf run (config attn_mode; lm-eval runs without "
                        "autograd, so FLA takes it for T > 64): fused_recurrent is exact float32, "
                        "chunk runs its float32 dots as TF32")
    p.add_argument("--out", default=None, help="JSON summary")
    args = p.parse_args(argv)

    from gdn_jax.lm_eval import tasks as lm_eval_tasks
    from gdn_jax.lm_eval.adapter import GdnJaxLM

    tasks_dir = args.tasks_dir or tempfile.mkdtemp(prefix="lm_eval_check_")
    counts = build_tasks(tasks_dir, args.lines, args.files)
    dtype = args.dtype or ("float32" if args.hf else None)
    lm = GdnJaxLM(workdir=args.workdir, step=args.step, dtype=dtype, batch_size=args.batch_size,
                  rolling_window=args.hf_max_length if args.hf else None)
    ours, times = evaluate(lm, tasks_dir, args.limit)
    import jax

    summary = {"command": " ".join(sys.argv), "device": str(jax.devices()[0]),
               "jax": jax.__version__, "workdir": args.workdir, "step": lm.run.step,
               "dtype": lm.dtype, "batch_size": args.batch_size, "documents": counts,
               "limit": args.limit,
               "gdn_jax": {"results": lm_eval_tasks.json_ready(ours["results"]), "time": times}}
    print(json.dumps(summary["gdn_jax"], indent=1))
    if args.hf:
        summary["hf"] = run_hf(args, tasks_dir, ours, lm)
        print(json.dumps(summary["hf"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


def set_fla_mode(fla_dir: str, mode: str) -> None:
    """Writes FLA's kernel choice (attn_mode) into an exported config.json."""
    path = os.path.join(fla_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["attn_mode"] = mode
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def run_hf(args, tasks_dir: str, ours: dict, lm) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_fla_fixtures

    make_fla_fixtures._interpreter_fixes()  # FLA's kernels on a CPU under TRITON_INTERPRET=1
    import fla  # noqa: F401  (registers gated_deltanet with transformers)
    import torch
    from lm_eval.models.huggingface import HFLM

    from gdn_jax.interop.workdir import export_fla
    from gdn_jax.lm_eval import tasks as lm_eval_tasks

    fla_dir = tempfile.mkdtemp(prefix="lm_eval_check_fla_")
    export_fla(args.workdir, fla_dir, step=args.step, dtype="float32", overwrite=True)
    if lm.run.cfg.data.tokenizer == "bytes":
        byte_tokenizer_files(fla_dir)
    set_fla_mode(fla_dir, args.hf_fla_mode)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_lm = HFLM(pretrained=fla_dir, dtype="float32", device=device,
                 batch_size=args.hf_batch_size, max_length=args.hf_max_length,
                 add_bos_token=bool(lm.encoder.context_prefix))
    hf, times = evaluate(hf_lm, tasks_dir, args.limit)
    return {"device": device, "torch": torch.__version__, "fla_dir": fla_dir,
            "fla_mode": args.hf_fla_mode,
            "results": lm_eval_tasks.json_ready(hf["results"]), "time": times,
            "agreement": agreement(ours, hf)}


if __name__ == "__main__":
    sys.exit(main())
