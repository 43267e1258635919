"""Perplexity over non-overlapping windows, and per-position loss for length extrapolation.

Both read a model through one function, `nll_fn(tokens_BxT, targets_BxT, segment_ids_BxT)`, which
returns the per-token negative log-likelihood −log p(target_t | tokens_≤t) as float [B, T]
(see gdn_jax.evaluate.runner.make_nll_fn). Working on NLLs instead of logits keeps the [B, T, V]
logits on the device.

Perplexity of a token stream x_0..x_{N−1} with a context window W:

    windows i = 0, 1, ...: inputs x[iW : iW+W], targets x[iW+1 : iW+W+1]
    PPL = exp( Σ NLL / #scored targets )

Every token but the first is scored once. A target is skipped where it starts a new document (its
segment id differs from its input's), since nothing before it predicts it.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

NllFn = Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]


class Progress:
    """Logs "what i/n  elapsed" at most every `every` seconds, and always for the last item."""

    def __init__(
        self, log: Callable[[str], None] | None, what: str, total: int, every: float = 10.0
    ):
        self.log, self.what, self.total, self.every = log, what, total, every
        self.t0 = self.last = time.time()

    def __call__(self, done: int) -> None:
        now = time.time()
        if self.log and (done >= self.total or now - self.last >= self.every):
            self.log(f"  {self.what} {done}/{self.total}  {now - self.t0:.1f}s")
            self.last = now


def pack_documents(docs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate tokenized documents; segment ids count documents from 1."""
    docs = [np.asarray(d, np.int32) for d in docs if len(d)]
    if not docs:
        raise ValueError("no tokens to evaluate")
    tokens = np.concatenate(docs)
    segs = np.concatenate([np.full(len(d), i + 1, np.int32) for i, d in enumerate(docs)])
    return tokens, segs


def windows(tokens_N: np.ndarray, segs_N: np.ndarray, window: int):
    """Inputs, targets, segment ids and target mask of every window, each [num_windows, window]."""
    N = len(tokens_N)
    if N < 2:
        raise ValueError("need at least two tokens")
    num = math.ceil((N - 1) / window)
    pad = num * window + 1 - N
    tok = np.concatenate([tokens_N, np.zeros(pad, np.int32)])
    seg = np.concatenate([segs_N, np.zeros(pad, np.int32)])  # 0: padding
    inputs = tok[:-1].reshape(num, window)
    targets = tok[1:].reshape(num, window)
    seg_in = seg[:-1].reshape(num, window)
    seg_tg = seg[1:].reshape(num, window)
    mask = (seg_tg == seg_in) & (seg_tg > 0)
    return inputs, targets, seg_in, mask


def perplexity(
    nll_fn: NllFn,
    tokens_N: np.ndarray,
    segs_N: np.ndarray,
    *,
    window: int,
    batch_size: int = 8,
    log: Callable[[str], None] | None = None,
) -> dict:
    """{"perplexity", "nll_per_token", "num_tokens", "num_windows", "window"} of the stream."""
    inputs, targets, seg_in, mask = windows(tokens_N, segs_N, window)
    num = len(inputs)
    # Pad the windows to whole batches with fully masked rows: one compiled shape for every batch.
    extra = (-num) % batch_size
    if extra:
        z = np.zeros((extra, window), np.int32)
        inputs, targets = np.concatenate([inputs, z]), np.concatenate([targets, z])
        seg_in, mask = np.concatenate([seg_in, z]), np.concatenate([mask, z.astype(bool)])
    total, count = 0.0, 0
    progress = Progress(log, "ppl: windows", num)
    for b in range(0, len(inputs), batch_size):
        sl = slice(b, b + batch_size)
        nll = np.asarray(nll_fn(inputs[sl], targets[sl], seg_in[sl]), np.float64)
        total += float(nll[mask[sl]].sum())
        count += int(mask[sl].sum())
        progress(min(b + batch_size, num))
    if count == 0:
        raise ValueError("no scored tokens")
    return {
        "perplexity": math.exp(total / count),
        "nll_per_token": total / count,
        "num_tokens": count,
        "num_windows": num,
        "window": window,
    }


def sequences_from_stream(tokens_N: np.ndarray, seq_len: int, num_seqs: int) -> np.ndarray:
    """num_seqs rows of seq_len + 1 contiguous tokens, spread evenly over the stream.

    Rows overlap when the stream is shorter than num_seqs · (seq_len + 1); a stream shorter than one
    row is repeated, which a caller should report.
    """
    L = seq_len + 1
    if len(tokens_N) < L:
        tokens_N = np.tile(tokens_N, math.ceil(L / len(tokens_N)))
    span = len(tokens_N) - L
    starts = np.linspace(0, span, num_seqs).astype(int) if num_seqs > 1 else np.zeros(1, int)
    return np.stack([tokens_N[s : s + L] for s in starts]).astype(np.int32)


def extrapolation_rows(
    docs: Sequence[Sequence[int]], seq_len: int, num_seqs: int
) -> tuple[np.ndarray, str]:
    """Rows of seq_len + 1 tokens for the extrapolation curve, and where they came from.

    Whole documents are best (one context, read from its start): the first seq_len + 1 tokens of the
    num_seqs longest documents, when that many are long enough. Otherwise the documents are joined
    into one stream and rows are spread over it ("stream"), repeating it when it is too short
    ("stream, repeated").
    """
    long_docs = sorted((d for d in docs if len(d) >= seq_len + 1), key=len, reverse=True)
    if len(long_docs) >= num_seqs:
        rows = np.stack([np.asarray(d[: seq_len + 1], np.int32) for d in long_docs[:num_seqs]])
        return rows, "documents"
    stream = np.concatenate([np.asarray(d, np.int32) for d in docs])
    kind = "stream" if len(stream) >= seq_len + 1 else "stream, repeated"
    return sequences_from_stream(stream, seq_len, num_seqs), kind


def per_position_loss(
    nll_fn: NllFn, rows_BxL1: np.ndarray, *, log: Callable[[str], None] | None = None
) -> np.ndarray:
    """Mean NLL at each position, [seq_len], over rows of seq_len + 1 tokens; one row per call so a
    long sequence needs the memory of one."""
    total = np.zeros(rows_BxL1.shape[1] - 1)
    progress = Progress(log, "extrapolation: sequences", len(rows_BxL1))
    for i, row in enumerate(rows_BxL1):
        nll = nll_fn(row[None, :-1], row[None, 1:], None)
        total += np.asarray(nll, np.float64)[0]
        progress(i + 1)
    return total / len(rows_BxL1)


def bucket_means(loss_T: np.ndarray, edges: Sequence[int]) -> list[float]:
    """Mean of loss_T over positions [edges[i], edges[i+1]) (0-based positions)."""
    return [float(np.mean(loss_T[a:b])) for a, b in zip(edges[:-1], edges[1:])]


def log2_edges(T: int) -> list[int]:
    """0, 1, 2, 4, ..., T: log-spaced buckets of positions."""
    edges = [0, 1]
    while edges[-1] * 2 < T:
        edges.append(edges[-1] * 2)
    return edges + [T]


def extrapolation_summary(loss_T: np.ndarray, train_seq_len: int) -> dict:
    """Per-bucket mean losses: log2 buckets, and whole multiples of the training length."""
    T = len(loss_T)
    edges = log2_edges(T)
    mult = sorted(
        {min(k * train_seq_len, T) for k in (1, 2, 4, 8, 16, 32) if (k // 2) * train_seq_len < T}
    )
    mult_edges = [0] + mult
    return {
        "seq_len": T,
        "train_seq_len": train_seq_len,
        "log2_bucket_edges": edges,
        "log2_bucket_mean_loss": bucket_means(loss_T, edges),
        "train_multiple_edges": mult_edges,
        "train_multiple_mean_loss": bucket_means(loss_T, mult_edges),
        "mean_loss_within_train_len": float(loss_T[:train_seq_len].mean()),
        "mean_loss_beyond_train_len": (
            float(loss_T[train_seq_len:].mean()) if T > train_seq_len else None
        ),
    }
