"""The grain input pipeline: documents -> shuffle -> tokenize -> pack into rows -> batch -> prefetch.

Row streams. The global batch has G rows; row r of every batch is cut from its own stream of
documents, the shuffled documents r, r + G, r + 2G, ... (document i of the endless shuffled order;
every epoch is a fresh permutation of the corpus). A process builds only the rows its devices hold,
so it reads only its share of the data, and the global batch is the same whatever the number of
processes. A row takes T + 1 consecutive tokens of its stream: inputs are the first T, targets the
last T. A document longer than what is left of a row carries on into the row's next batch (the
overlap token is the next row's first input), so no token is skipped or read twice.

The iterator state (per row: documents consumed, offset into the current one) is small JSON and is
saved with every checkpoint; `set_state` resumes exactly.

Batch fields, all [rows, T]:
  tokens int32, targets int32, loss_mask float32 (1 where the target is the next token of the same
  document), segment_ids int32 (1, 2, ... per document in the row; 0 = padding, never produced
  here), positions int32 (offset of the token in its document).
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from configs.experiment import DataConfig
from gdn_jax.data import sources as sources_lib
from gdn_jax.data.tokenizers import Tokenizer, get_tokenizer


def tokenized_documents(
    cfg: DataConfig, tokenizer: Tokenizer, split: str = "train"
) -> grain.MapDataset:
    """Endless, per-epoch shuffled MapDataset of int32 token arrays (index past len = later epochs)."""
    if cfg.source not in sources_lib.DOCUMENT_SOURCES:
        raise ValueError(
            f"data.source={cfg.source!r} is not a document source; known: "
            f"{', '.join(sources_lib.source_names())}"
        )
    docs = sources_lib.DOCUMENT_SOURCES[cfg.source](cfg, split)
    if len(docs) == 0:
        raise ValueError(f"data.source={cfg.source!r} split {split!r} has no documents")
    bos = [tokenizer.bos_id] if cfg.add_bos and tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if cfg.add_eos and tokenizer.eos_id is not None else []

    def encode(text: str) -> np.ndarray:
        return np.asarray(bos + tokenizer.encode(text) + eos, np.int32)

    return grain.MapDataset.source(docs).shuffle(seed=cfg.shuffle_seed).map(encode)


class PackedRowsIterator(grain.DatasetIterator):
    """Packs row streams of documents into [len(rows), seq_len] batches; see the module docstring."""

    def __init__(self, docs: grain.MapDataset, rows: Sequence[int], num_streams: int, seq_len: int):
        super().__init__()
        self._docs = docs
        self._rows = list(rows)
        self._G = num_streams
        self._T = seq_len
        self._next_doc = [0] * len(self._rows)  # documents of the stream started before this one
        self._offset = [0] * len(self._rows)  # tokens of the current document already consumed
        self._cache: dict[int, tuple[int, np.ndarray]] = {}  # row slot -> (doc index, tokens)

    def _doc(self, slot: int, k: int) -> np.ndarray:
        index = self._rows[slot] + k * self._G
        hit = self._cache.get(slot)
        if hit is None or hit[0] != index:
            tokens = self._docs[index]
            if len(tokens) == 0:
                tokens = np.zeros((0,), np.int32)
            hit = self._cache[slot] = (index, tokens)
        return hit[1]

    def __next__(self) -> dict[str, np.ndarray]:
        R, L = len(self._rows), self._T + 1
        tok = np.zeros((R, L), np.int32)
        seg = np.zeros((R, L), np.int32)
        pos = np.zeros((R, L), np.int32)
        for slot in range(R):
            k, off, filled, segment = self._next_doc[slot], self._offset[slot], 0, 0
            last = (k, off)
            while filled < L:
                doc = self._doc(slot, k)
                take = min(len(doc) - off, L - filled)
                if take > 0:
                    segment += 1
                    tok[slot, filled : filled + take] = doc[off : off + take]
                    seg[slot, filled : filled + take] = segment
                    pos[slot, filled : filled + take] = np.arange(off, off + take)
                    last = (k, off + take - 1)  # where the row's final slot came from
                    filled += take
                    off += take
                if off >= len(doc):
                    k, off = k + 1, 0
            # The last slot is only a target here; the next row starts by reading it as an input.
            self._next_doc[slot], self._offset[slot] = last
        same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
        return {
            "tokens": tok[:, :-1],
            "targets": tok[:, 1:],
            "loss_mask": same_doc.astype(np.float32),
            "segment_ids": seg[:, :-1],
            "positions": pos[:, :-1],
        }

    def get_state(self) -> dict[str, Any]:
        return {
            "rows": list(self._rows),
            "next_doc": list(self._next_doc),
            "offset": list(self._offset),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if list(state["rows"]) != self._rows:
            raise ValueError(
                f"data state is for rows {state['rows'][:4]}..., this process reads rows "
                f"{self._rows[:4]}...: resume with the same global batch and processes"
            )
        self._next_doc = [int(x) for x in state["next_doc"]]
        self._offset = [int(x) for x in state["offset"]]


class PackedRows(grain.IterDataset):
    def __init__(self, docs: grain.MapDataset, rows: Sequence[int], num_streams: int, seq_len: int):
        super().__init__()
        self._args = (docs, tuple(rows), num_streams, seq_len)

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(*self._args)


class SyntheticBatchesIterator(grain.DatasetIterator):
    """Rows `rows` of global batch i = make(i), i = 0, 1, ...; the state is i."""

    def __init__(self, make, rows: Sequence[int]):
        super().__init__()
        self._make, self._rows, self._index = make, np.asarray(rows), 0

    def __next__(self):
        batch = self._make(self._index)
        self._index += 1
        return {k: np.ascontiguousarray(v[self._rows]) for k, v in batch.items()}

    def get_state(self):
        return {"index": self._index}

    def set_state(self, state):
        self._index = int(state["index"])


class SyntheticBatches(grain.IterDataset):
    def __init__(self, make, rows: Sequence[int]):
        super().__init__()
        self._make, self._rows = make, tuple(rows)

    def __iter__(self):
        return SyntheticBatchesIterator(self._make, self._rows)


def make_dataset(
    cfg: DataConfig, *, global_batch: int, rows: Sequence[int], split: str = "train", seed: int = 0
) -> grain.IterDataset:
    """The grain dataset of this process's rows of every global batch.

    `rows` are the global row indices this process feeds (see `gdn_jax.train.mesh.local_rows`);
    `seed` seeds synthetic batch sources (document sources use cfg.shuffle_seed).
    """
    if cfg.source in sources_lib.BATCH_SOURCES:
        make = sources_lib.BATCH_SOURCES[cfg.source](cfg, global_batch=global_batch, seed=seed)
        ds = SyntheticBatches(make, rows)
    else:
        tokenizer = get_tokenizer(cfg.tokenizer)
        ds = PackedRows(tokenized_documents(cfg, tokenizer, split), rows, global_batch, cfg.seq_len)
    if cfg.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
    return ds


def vocab_size(cfg: DataConfig) -> int:
    """Token ids the data can hold (tokenizer vocab, or the synthetic task's)."""
    if cfg.source in sources_lib.BATCH_SOURCES:
        return int(cfg.options.get("vocab_size", 8192)) if cfg.source == "mqar" else 0
    return get_tokenizer(cfg.tokenizer).vocab_size
