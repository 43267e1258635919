"""The evaluation tasks run against a model: each returns a JSON-ready dict and writes its plot.

The model is read through three jitted views built here, so the tasks themselves stay numpy:
  nll_fn(tokens_BxT, targets_BxT, segment_ids_BxT | None) -> per-token NLL, float32 [B, T]
  argmax_fn(tokens_BxT) -> greedy next-token prediction at every position, int32 [B, T]
  generate_fn(prompt_BxP, max_new_tokens) -> greedily generated tokens, int32 [B, max_new_tokens]
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn_jax.evaluate import mqar, niah, perplexity, plots

Log = Callable[[str], None]


def make_nll_fn(model: nnx.Module) -> perplexity.NllFn:
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, tokens_BxT, targets_BxT, segment_ids_BxT):
        logits_BxTxV = nnx.merge(graphdef, state)(tokens_BxT, segment_ids=segment_ids_BxT)
        logits_BxTxV = logits_BxTxV.astype(jnp.float32)
        logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
        picked_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
        return logz_BxT - picked_BxT

    def fn(tokens_BxT, targets_BxT, segment_ids_BxT=None):
        return np.asarray(
            nll(
                state,
                jnp.asarray(tokens_BxT, jnp.int32),
                jnp.asarray(targets_BxT, jnp.int32),
                None if segment_ids_BxT is None else jnp.asarray(segment_ids_BxT, jnp.int32),
            )
        )

    return fn


def make_argmax_fn(model: nnx.Module) -> Callable[[np.ndarray], np.ndarray]:
    graphdef, state = nnx.split(model)

    @jax.jit
    def argmax(state, tokens_BxT):
        logits_BxTxV = nnx.merge(graphdef, state)(tokens_BxT, segment_ids=None)
        return jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32)

    return lambda tokens_BxT: np.asarray(argmax(state, jnp.asarray(tokens_BxT, jnp.int32)))


def _timer() -> Callable[[], str]:
    t0 = time.time()
    return lambda: f"{time.time() - t0:7.1f}s"


# ----------------------------------------------------------------------------------------- perplexity


def run_perplexity(
    nll_fn,
    token_docs: Sequence[Sequence[int]],
    *,
    window: int,
    batch_size: int,
    max_tokens: int | None,
    source: str,
    log: Log,
) -> dict:
    tokens, segs = perplexity.pack_documents(token_docs)
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens, segs = tokens[:max_tokens], segs[:max_tokens]
    log(f"[ppl] {len(tokens)} tokens from {source}, window {window}")
    out = perplexity.perplexity(nll_fn, tokens, segs, window=window, batch_size=batch_size, log=log)
    out["source"] = source
    log(f"[ppl] perplexity {out['perplexity']:.4f}  ({out['nll_per_token']:.4f} nats/token)")
    return out


# ------------------------------------------------------------------------------------- extrapolation


def run_extrapolation(
    nll_fn,
    token_docs: Sequence[Sequence[int]],
    *,
    train_seq_len: int,
    seq_len: int,
    num_seqs: int,
    out_dir: str,
    log: Log,
) -> dict:
    rows, rows_from = perplexity.extrapolation_rows(token_docs, seq_len, num_seqs)
    log(
        f"[extrapolation] {num_seqs} sequences of {seq_len} tokens "
        f"({seq_len / train_seq_len:.1f}x the training length {train_seq_len}) from {rows_from}"
    )
    loss_T = perplexity.per_position_loss(nll_fn, rows, log=log)
    out = perplexity.extrapolation_summary(loss_T, train_seq_len)
    out["num_sequences"] = num_seqs
    out["rows_from"] = rows_from
    path = os.path.join(out_dir, "extrapolation.png")
    plots.extrapolation_curve(loss_T, train_seq_len, path)
    np.save(os.path.join(out_dir, "extrapolation_loss.npy"), loss_T.astype(np.float32))
    edges, means = out["train_multiple_edges"], out["train_multiple_mean_loss"]
    for a, b, m in zip(edges[:-1], edges[1:], means):
        log(f"[extrapolation] positions [{a}, {b}): mean loss {m:.4f}")
    out["plot"] = os.path.basename(path)
    return out


# --------------------------------------------------------------------------------------------- MQAR


def run_mqar(
    argmax_fn,
    *,
    seq_len: int,
    vocab_size: int,
    kv_pairs: Sequence[int],
    num_examples: int,
    batch_size: int,
    seed: int,
    out_dir: str,
    log: Log,
) -> dict:
    clock = _timer()
    rows = []
    for d in kv_pairs:
        cfg = mqar.MQARConfig(seq_len=seq_len, num_kv_pairs=d, vocab_size=vocab_size)
        preds, targets, masks = [], [], []
        for i in range(0, num_examples, batch_size):
            batch = mqar.mqar_batch(cfg, batch_size=batch_size, seed=(seed, d, i))
            preds.append(argmax_fn(batch["tokens"]))
            targets.append(batch["targets"])
            masks.append(batch["loss_mask"])
        acc = mqar.mqar_accuracy(
            np.concatenate(preds)[:num_examples],
            np.concatenate(targets)[:num_examples],
            np.concatenate(masks)[:num_examples],
        )
        rows.append({"num_kv_pairs": d, **acc})
        log(
            f"[mqar] kv_pairs {d:4d}: accuracy {acc['accuracy']:.4f}  "
            f"sequence accuracy {acc['sequence_accuracy']:.4f}  {clock()}"
        )
    chance = mqar.chance_accuracy(mqar.MQARConfig(seq_len=seq_len, vocab_size=vocab_size))
    path = os.path.join(out_dir, "mqar.png")
    plots.mqar_curve(
        [r["num_kv_pairs"] for r in rows],
        [r["accuracy"] for r in rows],
        chance,
        f"MQAR, seq_len {seq_len}, vocab {vocab_size}",
        path,
    )
    return {
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "num_examples": num_examples,
        "chance": chance,
        "results": rows,
        "plot": os.path.basename(path),
    }


# ------------------------------------------------------------------------------------------- S-NIAH


def run_niah(
    generate_fn,
    tokenizer,
    *,
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    batch_size: int,
    essay_text: str,
    seed: int,
    out_dir: str,
    log: Log,
    prefix_ids: Sequence[int] = (),
    num_examples_kept: int = 3,
) -> dict:
    clock = _timer()
    out = {
        "lengths": list(lengths),
        "depths": list(depths),
        "samples_per_cell": samples,
        "tasks": {},
    }
    for task in tasks:
        em = np.zeros((len(depths), len(lengths)))
        contains = np.zeros_like(em)
        examples = []
        for j, length in enumerate(lengths):
            cells = [
                (
                    i,
                    niah.make_sample(
                        task,
                        tokenizer,
                        length=length,
                        depth=d,
                        seed=seed + s,
                        essay_text=essay_text,
                        prefix_ids=prefix_ids,
                    ),
                )
                for i, d in enumerate(depths)
                for s in range(samples)
            ]
            max_new = max(niah.answer_budget(tokenizer, c) for _, c in cells)
            for b in range(0, len(cells), batch_size):
                chunk = cells[b : b + batch_size]
                prompts = np.stack([c.prompt_tokens for _, c in chunk])
                if len(chunk) < batch_size:  # pad to one compiled batch shape
                    prompts = np.concatenate(
                        [prompts, np.repeat(prompts[-1:], batch_size - len(chunk), 0)]
                    )
                new_tokens = generate_fn(prompts, max_new)
                for (i, sample), toks in zip(chunk, new_tokens):
                    text = tokenizer.decode([int(t) for t in toks])
                    score = niah.score_answer(text, sample.answer)
                    em[i, j] += score["exact_match"] / samples
                    contains[i, j] += score["contains"] / samples
                    if len(examples) < num_examples_kept:
                        examples.append(
                            {
                                "length": length,
                                "depth": sample.depth,
                                "key": sample.key,
                                "answer": sample.answer,
                                "output": text,
                            }
                        )
            for i, d in enumerate(depths):
                log(
                    f"[{task}] length {length:6d} depth {100 * d:5.1f}%: exact match {em[i, j]:.2f}  "
                    f"{clock()}"
                )
        path = os.path.join(out_dir, f"niah_{task}.png")
        plots.niah_heatmap(
            em, depths, lengths, f"{task.upper().replace('_', '-')}: exact match", path
        )
        out["tasks"][task] = {
            "exact_match": em.tolist(),
            "contains": contains.tolist(),
            "mean_exact_match": float(em.mean()),
            "mean_exact_match_by_length": em.mean(0).tolist(),
            "examples": examples,
            "plot": os.path.basename(path),
        }
        log("\n" + format_niah_table(task, em, depths, lengths))
    return out


def format_niah_table(task: str, acc_DxL: np.ndarray, depths, lengths) -> str:
    head = f"{task:>10} | " + " ".join(f"{n:>7d}" for n in lengths)
    lines = [head, "-" * len(head)]
    for d, row in zip(depths, acc_DxL):
        lines.append(f"{100 * d:9.1f}% | " + " ".join(f"{x:7.2f}" for x in row))
    lines.append(f"{'mean':>10} | " + " ".join(f"{x:7.2f}" for x in np.mean(acc_DxL, 0)))
    return "\n".join(lines)
