"""What eval.py needs from a run directory: config, model at a checkpoint, tokenizer, texts."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gdn_jax.evaluate import mqar, niah

DEFAULT_MQAR_KV = (4, 8, 16, 32, 64)


@dataclasses.dataclass
class Run:
    cfg: Any  # configs.experiment.ExperimentConfig of the run
    model: nnx.Module  # gdn_jax.model.LM with the checkpoint's parameters
    step: int  # checkpoint step
    tokenizer: Any  # gdn_jax.data.tokenizers.Tokenizer named by cfg.data.tokenizer

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))


def load_run(workdir: str, step: int | None = None) -> Run:
    """The run's config.json and its latest (or `step`) checkpoint. FileNotFoundError when either
    is missing."""
    from configs.experiment import get_config
    from gdn_jax.data.tokenizers import get_tokenizer
    from gdn_jax.train import checkpoint

    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(f"{workdir}/config.json not found: is this a train.py workdir?")
    cfg = get_config(os.path.join(workdir, "config.json"))
    ckpt_dir = checkpoint.checkpoint_dir(workdir)
    steps = ocp.utils.checkpoint_steps(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint under {ckpt_dir}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(
            f"no checkpoint for step {step} under {ckpt_dir}; steps: " f"{sorted(steps)}"
        )
    _, model = checkpoint.load_params(workdir, step)
    return Run(cfg=cfg, model=model, step=int(step), tokenizer=get_tokenizer(cfg.data.tokenizer))


def bos_prefix(run: Run) -> list[int]:
    """[BOS] when the run trained with one before each document, else []."""
    bos = run.tokenizer.bos_id
    return [bos] if run.cfg.data.add_bos and bos is not None else []


def encode_document(run: Run, text: str) -> list[int]:
    """A document's ids framed as in training (BOS / EOS when the data config adds them)."""
    ids = bos_prefix(run) + list(run.tokenizer.encode(text))
    if run.cfg.data.add_eos and run.tokenizer.eos_id is not None:
        ids.append(run.tokenizer.eos_id)
    return ids


def heldout_token_docs(
    run: Run, data_file: str | None, max_tokens: int = 4_000_000
) -> tuple[list[list[int]], str]:
    """Tokenized held-out documents (at most ~max_tokens) and a description of where they came from:
    the file `data_file` as one document, else the held-out split of the run's document source
    (the embedded corpus for runs trained on a synthetic batch source)."""
    if data_file is not None:
        if not os.path.isfile(data_file):
            raise FileNotFoundError(f"--data {data_file!r}: no such file")
        with open(data_file, encoding="utf-8", errors="replace") as f:
            texts, source = [f.read()], data_file
    else:
        from gdn_jax.data import sources

        name = run.cfg.data.source
        if name not in sources.DOCUMENT_SOURCES:
            name = "embedded"
        texts, source = (
            sources.DOCUMENT_SOURCES[name](run.cfg.data, split="heldout"),
            f"{name}:heldout",
        )
    docs, total = [], 0
    for text in texts:
        docs.append(encode_document(run, text))
        total += len(docs[-1])
        if total >= max_tokens:
            break
    return docs, source


def haystack_text(path: str | None) -> tuple[str, str]:
    """Natural prose for S-NIAH-2/3: a user file, or docstring prose of the embedded held-out split."""
    if path is not None:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(), path
    from gdn_jax.data.corpus import embedded_documents

    return niah.prose_from_python(embedded_documents("heldout")), "embedded:heldout docstrings"


def mqar_settings(run: Run, args) -> tuple[int, int, list[int]]:
    """(seq_len, vocab_size, kv-pair counts): CLI flags, else the run's MQAR training setup, else
    seq_len 256 and the model's vocabulary capped at 8192."""
    opts = run.cfg.data.options if run.cfg.data.source == "mqar" else {}
    trained_len = run.cfg.data.seq_len if run.cfg.data.source == "mqar" else 256
    seq_len = args.mqar_seq_len or trained_len
    vocab = args.mqar_vocab or opts.get("vocab_size") or min(8192, run.cfg.model.vocab_size)
    if vocab > run.cfg.model.vocab_size:
        raise ValueError(
            f"MQAR vocab {vocab} exceeds the model's vocab_size " f"{run.cfg.model.vocab_size}"
        )
    kv = args.mqar_kv_pairs
    if kv is None:
        kv = sorted({*DEFAULT_MQAR_KV, *([opts["num_kv_pairs"]] if "num_kv_pairs" in opts else [])})
        kv = [d for d in kv if 4 * d <= seq_len and d < vocab // 2]
    for d in kv:
        mqar.MQARConfig(seq_len=seq_len, num_kv_pairs=d, vocab_size=vocab).validate()
    return seq_len, vocab, list(kv)


def make_generate_fn(run: Run, **sampling):
    """generate_fn(prompt_BxP, max_new_tokens, eos_id=None) -> new tokens [B, max_new_tokens];
    greedy unless sampling options (temperature, top_k, top_p, seed) say otherwise.

    The model's inference copy (weights cast once to the compute dtype, gdn_jax/inference.py) is
    made here, once; each call is one compiled prefill and one compiled on-device token loop."""
    from gdn_jax import generate as gen
    from gdn_jax.inference import for_inference

    model = for_inference(run.model)
    temperature = sampling.get("temperature", 0.0)
    seed = sampling.get("seed", 0)

    def generate_fn(prompt_BxP: np.ndarray, max_new_tokens: int, eos_id: int | None = None):
        out = gen.generate(
            model,
            np.asarray(prompt_BxP, np.int32),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=sampling.get("top_k"),
            top_p=sampling.get("top_p"),
            rng=jax.random.key(seed),
            eos_id=eos_id,
        )
        return np.asarray(out)  # [B, max_new_tokens], the prompt not repeated

    return generate_fn


def sample_text(
    run: Run,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
) -> str:
    """A sampled continuation of `prompt`, decoded; the loop stops at EOS."""
    ids = np.asarray([bos_prefix(run) + list(run.tokenizer.encode(prompt))], np.int32)
    eos = run.tokenizer.eos_id
    new = make_generate_fn(run, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)(
        ids, max_new_tokens, eos_id=eos
    )[0].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return run.tokenizer.decode(new)
