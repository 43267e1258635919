"""Offline fixtures for the lm-eval tests: a tiny random-init run directory and local tasks.

The tasks are YAML files over JSONL written here, read through lm-eval's `json` data set builder,
which reads local files only. Lengths are chosen so that every scored row has 68..95 inputs and
every prompt 41 or 47 tokens, so few shapes compile.
"""

from __future__ import annotations

import json
import os
import random

from flax import nnx

from configs import experiment
from gdn_jax.model import LM
from gdn_jax.train import checkpoint

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()


def make_workdir(path: str, preset: str = "tiny_h1") -> str:
    """A train.py-style run directory (config.json + weights-only checkpoint at step 0) holding a
    random-init model: GDN and sliding-window attention (window 16), byte tokenizer, float32. The
    init scale 0.3 makes greedy continuations vary with the prompt."""
    cfg = experiment.apply_overrides(experiment.get_config(preset),
                                     ["data.seq_len=64", "model.init_std=0.3"])
    model = LM(cfg.model, rngs=nnx.Rngs(0))
    os.makedirs(path, exist_ok=True)
    checkpoint.save_weights_only(path, 0, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(experiment.to_dict(cfg), f, indent=1)
    return path


def _words(r: random.Random, lo: int, hi: int) -> str:
    """Words joined by spaces, cut to a length in [lo, hi] characters, no space at either end."""
    n = r.randint(lo, hi)
    text = ""
    while len(text) < n:
        text += r.choice(WORDS) + " "
    return text[:n - 1] + ("s" if text[n - 1] == " " else text[n - 1])


def mc_docs(n: int = 12) -> list[dict]:
    r = random.Random(0)
    docs = []
    for _ in range(n):
        choices = [_words(r, 5, 20) for _ in range(r.randint(2, 4))]
        docs.append({"question": _words(r, 55, 65), "choices": choices,
                     "label": r.randrange(len(choices))})
    return docs


def rolling_docs(n: int = 5) -> list[dict]:
    r = random.Random(1)
    return [{"text": _words(r, 70, 95)} for _ in range(n)]


def gen_prompts(n: int = 10) -> list[str]:
    r = random.Random(2)
    return [_words(r, 40, 40) if i % 2 else _words(r, 46, 46) for i in range(n)]


def write_task(tasks_dir: str, name: str, docs: list[dict], **config) -> str:
    """tasks_dir/NAME.yaml over tasks_dir/NAME.jsonl; config holds the task's other YAML keys.
    The YAML is written as JSON (a subset of YAML), so any stop string survives escaped."""
    os.makedirs(tasks_dir, exist_ok=True)
    data = os.path.join(tasks_dir, f"{name}.jsonl")
    with open(data, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    spec = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": data}}, "test_split": "test", **config}
    with open(os.path.join(tasks_dir, f"{name}.yaml"), "w") as f:
        json.dump(spec, f, indent=1)
    return name


def write_mc_task(tasks_dir: str) -> str:
    return write_task(tasks_dir, "toy_mc", mc_docs(), output_type="multiple_choice",
                      doc_to_text="Q: {{question}}\nA:", doc_to_target="label",
                      doc_to_choice="choices",
                      metric_list=[{"metric": "acc", "aggregation": "mean",
                                    "higher_is_better": True}])


def write_rolling_task(tasks_dir: str) -> str:
    return write_task(tasks_dir, "toy_rolling", rolling_docs(),
                      output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                      metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}])


def write_gen_task(tasks_dir: str, until: list[str], max_gen_toks: int, name: str = "toy_gen",
                   **generation_kwargs) -> str:
    return write_task(tasks_dir, name, [{"prompt": p, "answer": "x"} for p in gen_prompts()],
                      output_type="generate_until", doc_to_text="{{prompt}}",
                      doc_to_target="{{answer}}",
                      generation_kwargs={"until": until, "max_gen_toks": max_gen_toks,
                                         **generation_kwargs},
                      metric_list=[{"metric": "exact_match", "aggregation": "mean",
                                    "higher_is_better": True}])
