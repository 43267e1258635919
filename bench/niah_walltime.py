"""S-NIAH's wall time through eval.py's generation path, before and after issue 11, on one model.

    python3 bench/niah_walltime.py --workdir runs/tiny                 # a train.py workdir
    python3 bench/niah_walltime.py --preset fla_gdn_1.3b               # random weights
    python3 bench/niah_walltime.py --preset tiny --lengths 512 --samples 1 --depths 0.5   # CPU check

Both paths run `gdn_jax.evaluate.runner.run_niah` (what `eval.py --tasks niah` runs) on the same
prompts:
  after   eval.py's generate_fn (`loading.make_generate_fn`): the inference copy (matmul weights cast
          once to the compute dtype, projections fused), one compiled prefill per prompt length and
          the whole token loop on the device (`gdn_jax.generate.generate`).
  before  what eval.py did before issue 11: the float32 training model, a compiled prefill, then one
          compiled `decode_step` dispatched from Python per new token, each read back to the host.
Each path's wall seconds include its compiles (as eval.py's do); "again" repeats the call with
everything compiled. Greedy answers of the two paths are compared: with random weights bf16 and
float32 logits can order near-ties differently, so agreement is reported, not required.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python_loop_generate_fn(model):
    """generate_fn(prompt_BxP, max_new_tokens, eos_id=None) -> [B, max_new_tokens], the pre-issue-11
    way: prefill once, then a Python loop of compiled decode steps (greedy)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from gdn_jax import generate as G

    graphdef, state = nnx.split(model)
    greedy = dict(temperature=0.0, top_k=None, top_p=None)

    def generate_fn(prompt_BxP, max_new_tokens, eos_id=None):
        prompt = jnp.asarray(np.asarray(prompt_BxP), jnp.int32)
        tok, cache, rng = G.prefill(graphdef, state, prompt, None, jax.random.key(0),
                                    cache_len=prompt.shape[1] + max_new_tokens, **greedy)
        out = [np.asarray(tok)]
        while len(out) < max_new_tokens:
            if eos_id is not None and (out[-1] == eos_id).all():
                break
            tok, _, cache = G.decode_step(graphdef, state, cache, tok, rng, **greedy)
            new = np.asarray(tok)
            if eos_id is not None:  # a row that emitted EOS keeps emitting it, as generate() does
                new = np.where(out[-1] == eos_id, eos_id, new)
            out.append(new)
        out += [out[-1]] * (max_new_tokens - len(out))  # only reached when every row is at EOS
        return np.stack(out, axis=1)

    return generate_fn


def build_run(args):
    from flax import nnx

    from gdn_jax.evaluate import loading

    if args.workdir:
        return loading.load_run(args.workdir)
    from configs.experiment import get_config
    from gdn_jax.data.tokenizers import get_tokenizer
    from gdn_jax.model import LM

    cfg = get_config(args.preset)
    return loading.Run(cfg=cfg, model=LM(cfg.model, rngs=nnx.Rngs(args.seed)), step=0,
                       tokenizer=get_tokenizer(cfg.data.tokenizer))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a train.py workdir (its latest checkpoint)")
    src.add_argument("--preset", help="a model preset with random weights, e.g. fla_gdn_1.3b")
    p.add_argument("--tasks", default="s_niah_1,s_niah_2,s_niah_3")
    p.add_argument("--lengths", default="1024,2048,4096", help="prompt lengths in tokens")
    p.add_argument("--depths", default="0.0,0.5,1.0", help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=2, help="samples per (length, depth) cell")
    p.add_argument("--batch", type=int, default=10, help="prompts generated together")
    p.add_argument("--paths", default="after,before", help="comma list of after, before")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
        depths = [float(x) for x in args.depths.split(",") if x]
    except ValueError:
        p.error(f"--lengths / --depths must be comma lists of numbers, got {args.lengths!r} / {args.depths!r}")
    if not lengths or min(lengths) < 1:
        p.error(f"--lengths must be positive integers, got {args.lengths!r}")
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        p.error(f"--depths must lie in [0, 1], got {args.depths!r}")
    paths = [x for x in args.paths.split(",") if x]
    if not paths or set(paths) - {"after", "before"}:
        p.error(f"--paths must be a comma list of after, before; got {args.paths!r}")

    import jax
    import numpy as np

    from gdn_jax.evaluate import loading, runner
    from gdn_jax.evaluate.niah import TASKS

    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks or set(tasks) - set(TASKS):
        p.error(f"--tasks must be a comma list of {', '.join(TASKS)}; got {args.tasks!r}")
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:7.1f} s] {msg}", flush=True)
    run = build_run(args)
    log(f"{run.cfg.model.name}: {run.num_params / 1e6:,.1f}M params on {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}")
    essay, _ = loading.haystack_text(None)
    makers = {"after": lambda: loading.make_generate_fn(run),
              "before": lambda: python_loop_generate_fn(run.model)}
    results = dict(model=run.cfg.model.name, tasks=tasks, lengths=lengths, depths=depths,
                   samples=args.samples, batch=args.batch, device=jax.devices()[0].device_kind,
                   jax=jax.__version__, seconds={}, seconds_again={}, answers={})
    for path in paths:
        fn = makers[path]()
        answers = []

        def recording(prompt, max_new_tokens, eos_id=None, fn=fn, answers=answers):
            out = fn(prompt, max_new_tokens, eos_id)
            answers.append(np.asarray(out))
            return out

        for key in ("seconds", "seconds_again"):
            answers.clear()
            t0 = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                scores = runner.run_niah(recording, run.tokenizer, tasks=tasks, lengths=lengths,
                                         depths=depths, samples=args.samples, batch_size=args.batch,
                                         essay_text=essay, seed=args.seed, out_dir=tmp,
                                         log=lambda m: None, prefix_ids=loading.bos_prefix(run))
            results[key][path] = round(time.time() - t0, 2)
            log(f"{path}: S-NIAH {results[key][path]:.2f} s ({key.replace('_', ' ')})")
        results["answers"][path] = answers
        results.setdefault("mean_exact_match", {})[path] = {
            t: scores["tasks"][t]["mean_exact_match"] for t in tasks}
    if len(paths) == 2:
        a, b = results["answers"]["after"], results["answers"]["before"]
        same = sum(int((x == y).all(axis=1).sum()) for x, y in zip(a, b))
        total = sum(x.shape[0] for x in a)
        results["answers_identical"] = f"{same}/{total}"
        log(f"answers identical in {same} of {total} prompts; wall time before/after: "
            f"{results['seconds']['before'] / results['seconds']['after']:.2f}x with compiles, "
            f"{results['seconds_again']['before'] / results['seconds_again']['after']:.2f}x compiled")
    del results["answers"]
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
