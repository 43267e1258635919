"""Continuations for lm-eval's generate_until: the fast generation path, cut at stop strings.

A request (context, gen_kwargs) becomes prompt ids (encoding.Encoder.prompt), up to max_gen_toks
new ids from gdn_jax.generate.generate (one compiled prefill, then the token loop on the device),
and then text: the new ids before the first EOS, decoded, cut before the first occurrence of any
stop string in `until`. Decoding is greedy unless the task asks for do_sample with a temperature
above 0, as in lm-eval's Hugging Face backend.

Requests with the same options are sorted by prompt length, longest first, and generated
batch_size at a time: prompts are left-padded to a bucket width (generate's prompt_lengths gives
the pads segment id 0, so no real token reads them) and a short last batch repeats its last prompt,
so each (width, options) compiles once.

Early exit: the device loop stops a row at one token id. That is the tokenizer's EOS, or a stop
string that is a single token of its own (such as "\\n" for the byte tokenizer), since most tasks
stop at one. Both give the same text: what follows a stop string is cut anyway, and an EOS before
it is found on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from gdn_jax import generate as gen
from gdn_jax.lm_eval.encoding import Encoder, task_error
from gdn_jax.lm_eval.scoring import bucket

# Hugging Face generate() options that lm-eval tasks set and that change nothing at these values.
NEUTRAL_KWARGS = {"num_beams": 1, "repetition_penalty": 1.0, "num_return_sequences": 1}


@dataclasses.dataclass(frozen=True)
class Options:
    until: tuple[str, ...]  # stop strings; the text is cut before the first one found
    max_gen_toks: int  # new tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None


def parse_options(gen_kwargs: dict, task: str | None, default_max_gen_toks: int) -> Options:
    """lm-eval generation kwargs -> Options; anything this model cannot honour is an error naming
    the task and the option."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise task_error(task, f"generation option until must be a string or a list of strings, "
                               f"got {until!r}")
    max_gen_toks = int(kw.pop("max_gen_toks", default_max_gen_toks))
    if max_gen_toks < 1:
        raise task_error(task, f"max_gen_toks must be >= 1, got {max_gen_toks}")
    do_sample = bool(kw.pop("do_sample", False))
    temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
    top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", None)
    for key, neutral in NEUTRAL_KWARGS.items():
        if key in kw and kw[key] == neutral:
            kw.pop(key)
    if kw:
        raise task_error(task, f"generation option(s) {kw} are not supported by the gdn_jax model "
                               f"(it honours until, max_gen_toks, do_sample, temperature, top_k, "
                               f"top_p)")
    if not do_sample or temperature == 0:
        return Options(tuple(u for u in until if u), max_gen_toks)
    return Options(tuple(u for u in until if u), max_gen_toks, temperature,
                   None if top_k is None else int(top_k), None if top_p is None else float(top_p))


def cut(text: str, until: Sequence[str]) -> str:
    """text before the first occurrence of any stop string."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


class Generator:
    """Runs generate_until requests on `model` (an inference copy, gdn_jax/inference.py)."""

    def __init__(self, model, encoder: Encoder, *, batch_size: int, seed: int = 0):
        self.model, self.encoder = model, encoder
        self.batch_size, self.seed = batch_size, seed
        self.calls = 0  # batches generated, folded into the sampling key

    def exit_id(self, options: Options) -> int | None:
        tok = self.encoder.tokenizer
        for stop in options.until:
            ids = tok.encode(stop)
            if len(ids) == 1 and tok.decode(ids) == stop:
                return ids[0]
        return tok.eos_id

    def generate(self, prompts: Sequence[list[int]], options: Sequence[Options],
                 progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Texts in the order of `prompts`; progress(requests done, tokens) after each batch, the
        tokens being the prompts' and the new ones up to each row's exit."""
        out: list[str | None] = [None] * len(prompts)
        groups: dict[Options, list[int]] = {}
        for i, opt in enumerate(options):
            groups.setdefault(opt, []).append(i)
        done = tokens = 0
        for opt, idx in groups.items():
            idx.sort(key=lambda i: -len(prompts[i]))
            for b in range(0, len(idx), self.batch_size):
                batch = idx[b:b + self.batch_size]
                texts, new_tokens = self._batch([prompts[i] for i in batch], opt)
                for i, text in zip(batch, texts):
                    out[i] = text
                done += len(batch)
                tokens += sum(len(prompts[i]) for i in batch) + new_tokens
                if progress:
                    progress(done, tokens)
        return out

    def _batch(self, prompts: Sequence[list[int]], opt: Options) -> tuple[list[str], int]:
        P = bucket(max(len(p) for p in prompts), floor=16)
        rows = list(prompts) + [prompts[-1]] * (self.batch_size - len(prompts))
        tokens = np.zeros((len(rows), P), np.int32)
        for r, p in enumerate(rows):
            tokens[r, P - len(p):] = p
        lengths = np.asarray([len(p) for p in rows], np.int32)
        rng = jax.random.fold_in(jax.random.key(self.seed), self.calls)
        self.calls += 1
        exit_id = self.exit_id(opt)
        new = np.asarray(gen.generate(self.model, tokens, max_new_tokens=opt.max_gen_toks,
                                      temperature=opt.temperature, top_k=opt.top_k,
                                      top_p=opt.top_p, rng=rng, prompt_lengths=lengths,
                                      eos_id=exit_id))
        eos = self.encoder.tokenizer.eos_id
        texts, count = [], 0
        for ids in new[:len(prompts)].tolist():
            count += ids.index(exit_id) + 1 if exit_id in ids else len(ids)
            if eos is not None and eos in ids:
                ids = ids[:ids.index(eos)]
            texts.append(cut(self.encoder.decode(ids), opt.until))
        return texts, count
