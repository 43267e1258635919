"""Multi-query associative recall (MQAR), after Zoology (Arora, Eyuboglu et al., 2023).

A data source for training and the accuracy metric for evaluation.

    batch = mqar_batch(MQARConfig(...), batch_size=B, seed=s)   # numpy, deterministic in (cfg, B, s)
    batch["tokens"]     int32 [B, T]  model input
    batch["targets"]    int32 [B, T]  next-token target at every position (tokens shifted left)
    batch["loss_mask"]  float32 [B, T] 1.0 exactly at the query positions, 0.0 elsewhere
    batch["segment_ids"] int32 [B, T] all ones (one sequence per row; nothing is packed)

    for batch in mqar_batches(cfg, batch_size=B, seed=s): ...  # endless; batch i uses seed (s, i)

Layout of one row, with D = num_kv_pairs and T = seq_len:

    k_1 v_1 k_2 v_2 ... k_D v_D | q . q . . q . ...
    <------ 2D positions ------> <------ T - 2D positions ------>

Keys are drawn without replacement from [1, V/2), values from [V/2, V), V = vocab_size. Every key is
queried exactly once, in a random order, at an even offset 2·gap of the query region; the gap follows
Zoology's power law p(gap) ∝ gap^(a−1) (small a puts queries close to the start of the query
region). At a query position the target is the key's value; the loss and the accuracy read only
those positions. Other positions of the query region hold uniform random tokens from [0, V) when
`random_non_queries`, else 0, and their targets are the next token (masked out).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    seq_len: int = 256  # T, tokens per row
    num_kv_pairs: int = 16  # D, key-value pairs per row; each key is queried once
    vocab_size: int = 8192  # V, token ids lie in [0, V); keys in [1, V/2), values in [V/2, V)
    power_a: float = 0.01  # Zoology's power-law exponent for the query gaps (1.0 = uniform)
    random_non_queries: bool = True  # fill non-query slots with random tokens instead of 0

    def validate(self) -> None:
        if self.seq_len % 2:
            raise ValueError(f"seq_len must be even, got {self.seq_len}")
        if self.num_kv_pairs < 1:
            raise ValueError(f"num_kv_pairs must be >= 1, got {self.num_kv_pairs}")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} too short for num_kv_pairs={self.num_kv_pairs} (needs 4·D)"
            )
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(
                f"vocab_size={self.vocab_size} has too few keys for num_kv_pairs={self.num_kv_pairs}"
            )
        if not 0.0 < self.power_a <= 1.0:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")


def _sample_without_replacement(rng: np.random.Generator, logp_N: np.ndarray, rows: int, k: int):
    """k distinct indices per row, drawn sequentially ∝ exp(logp) (Gumbel top-k)."""
    scores_RxN = logp_N[None, :] + rng.gumbel(size=(rows, logp_N.shape[0]))
    return np.argsort(-scores_RxN, axis=1, kind="stable")[:, :k]


def mqar_batch(cfg: MQARConfig, *, batch_size: int, seed: int | tuple[int, ...]) -> dict:
    """One batch of MQAR rows; the same (cfg, batch_size, seed) always gives the same batch."""
    cfg.validate()
    B, T, D, V = batch_size, cfg.seq_len, cfg.num_kv_pairs, cfg.vocab_size
    rng = np.random.default_rng(seed)
    half = V // 2
    keys_BxD = 1 + _sample_without_replacement(rng, np.zeros(half - 1), B, D)
    values_BxD = half + _sample_without_replacement(rng, np.zeros(V - half), B, D)

    context = 2 * D
    space = (T - context) // 2  # query slots at even offsets of the query region
    gap_logp = np.log(cfg.power_a) + (cfg.power_a - 1.0) * np.log(np.arange(1, space + 1))
    gaps_BxD = _sample_without_replacement(rng, gap_logp, B, D)
    query_pos_BxD = context + 2 * gaps_BxD

    if cfg.random_non_queries:
        tokens_BxT = rng.integers(0, V, size=(B, T))
    else:
        tokens_BxT = np.zeros((B, T), np.int64)
    tokens_BxT[:, 0:context:2] = keys_BxD
    tokens_BxT[:, 1:context:2] = values_BxD
    np.put_along_axis(tokens_BxT, query_pos_BxD, keys_BxD, axis=1)

    targets_BxT = np.zeros((B, T), np.int64)
    targets_BxT[:, :-1] = tokens_BxT[:, 1:]
    np.put_along_axis(targets_BxT, query_pos_BxD, values_BxD, axis=1)
    mask_BxT = np.zeros((B, T), np.float32)
    np.put_along_axis(mask_BxT, query_pos_BxD, 1.0, axis=1)
    return {
        "tokens": tokens_BxT.astype(np.int32),
        "targets": targets_BxT.astype(np.int32),
        "loss_mask": mask_BxT,
        "segment_ids": np.ones((B, T), np.int32),
    }


def mqar_batches(
    cfg: MQARConfig, *, batch_size: int, seed: int = 0, start: int = 0
) -> Iterator[dict]:
    """Endless stream of batches; batch i is mqar_batch(..., seed=(seed, i)), so resuming at step
    `start` reproduces the stream exactly."""
    i = start
    while True:
        yield mqar_batch(cfg, batch_size=batch_size, seed=(seed, i))
        i += 1


def mqar_accuracy(
    predictions_BxT: np.ndarray, targets_BxT: np.ndarray, loss_mask_BxT: np.ndarray
) -> dict:
    """Accuracy of predicted next tokens at the query positions.

    Returns {"accuracy": fraction of queries right, "sequence_accuracy": fraction of rows with every
    query right, "num_queries": int}.
    """
    mask = np.asarray(loss_mask_BxT) > 0
    hit = (np.asarray(predictions_BxT) == np.asarray(targets_BxT)) & mask
    n = int(mask.sum())
    if n == 0:
        raise ValueError("loss_mask selects no query positions")
    row_ok = hit.sum(axis=1) == mask.sum(axis=1)
    return {
        "accuracy": float(hit.sum() / n),
        "sequence_accuracy": float(row_ok.mean()),
        "num_queries": n,
    }


def lookup_predictions(tokens_BxT: np.ndarray, num_kv_pairs: int) -> np.ndarray:
    """The perfect solver, written from the task's definition: read the key-value prefix, then answer
    every later occurrence of a key with its value (elsewhere -1). A reference for tests."""
    preds_BxT = np.full_like(tokens_BxT, -1)
    for b, row in enumerate(tokens_BxT):
        table = {int(row[2 * i]): int(row[2 * i + 1]) for i in range(num_kv_pairs)}
        for t in range(2 * num_kv_pairs, len(row)):
            preds_BxT[b, t] = table.get(int(row[t]), -1)
    return preds_BxT


def chance_accuracy(cfg: MQARConfig) -> float:
    """Accuracy of a guesser that knows the answer is a value token but not which one."""
    return 1.0 / (cfg.vocab_size - cfg.vocab_size // 2)
