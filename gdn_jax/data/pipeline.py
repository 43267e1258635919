"""The grain input pipeline: documents -> shuffle -> tokenize -> pack into rows -> batch -> prefetch.

Row streams. The global batch has G rows; row r of every batch is cut from its own stream of
documents, the shuffled documents r, r + G, r + 2G, ... (document i of the endless shuffled order;
every epoch is a fresh permutation of the corpus). A process builds only the rows its devices hold,
so it reads only its share of the data, and the global batch is the same whatever the number of
processes. A row takes T + 1 consecutive tokens of its stream: inputs are the first T, targets the
last T. A document longer than what is left of a row carries on into the row's next batch (the
overlap token is the next row's first input), so no token is skipped or read twice.

The data position is global: per global row, the documents its stream has consumed and the offset
into the current one. Each process's iterator state holds its rows' entries (small JSON, saved with
every checkpoint); the union over processes is the global state (`merge_states`), and `set_state`
takes any state that covers the iterator's rows. So a run saved by N processes resumes exactly on
M processes with the same global batch. Another global batch would deal the documents to rows
differently, so the same order could not continue: `set_state` refuses it.

Batch fields, all [rows, T]:
  tokens int32, targets int32, loss_mask float32 (1 where the target is the next token of the same
  document), segment_ids int32 (1, 2, ... per document in the row; 0 = padding, never produced
  here), positions int32 (offset of the token in its document), document_ids int64 (index of the
  token's document in the endless shuffled order: with positions, a global id of every token, for
  audits; the train step does not read it).
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
        ids = np.zeros((R, L), np.int64)
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
                    ids[slot, filled : filled + take] = self._rows[slot] + k * self._G
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
            "document_ids": ids[:, :-1],
        }

    def get_state(self) -> dict[str, Any]:
        return {
            "global_batch": self._G,
            "rows": list(self._rows),
            "next_doc": list(self._next_doc),
            "offset": list(self._offset),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes from a state holding (at least) this iterator's rows: its own, or the global
        state merged from all processes' (`merge_states`)."""
        saved_G = state.get("global_batch", self._G)  # states before elastic resume lacked it
        if saved_G != self._G:
            raise ValueError(
                f"the data position was saved with train.global_batch={saved_G}, this run has "
                f"{self._G}: documents are dealt to rows by index modulo the global batch, so "
                f"another global batch cannot continue the same sample order. Resume with "
                f"train.global_batch={saved_G} (any number of processes works), or start a new "
                "run (train.py --init_from keeps the weights)")
        at = {r: (d, o) for r, d, o in zip(state["rows"], state["next_doc"], state["offset"])}
        missing = [r for r in self._rows if r not in at]
        if missing:
            raise ValueError(f"the data state has no position for rows {missing[:8]}: it covers "
                             f"{len(at)} rows of {self._G}")
        self._next_doc = [int(at[r][0]) for r in self._rows]
        self._offset = [int(at[r][1]) for r in self._rows]


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


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The global data position from the iterator states of all processes (any order): the union of
    the packed rows' positions, or the batch index of a synthetic source (the same everywhere)."""
    if not states:
        raise ValueError("no data-iterator states to merge")
    if "rows" not in states[0]:
        if any(s != states[0] for s in states):
            raise ValueError(f"processes saved different data positions: {states}")
        return dict(states[0])
    G = {s.get("global_batch") for s in states}
    if len(G) != 1:
        raise ValueError(f"processes saved data positions for different global batches {G}")
    at = {}
    for s in states:
        for r, d, o in zip(s["rows"], s["next_doc"], s["offset"]):
            if at.setdefault(r, (d, o)) != (d, o):
                raise ValueError(f"processes saved different positions for row {r}")
    rows = sorted(at)
    merged = {"rows": rows, "next_doc": [at[r][0] for r in rows],
              "offset": [at[r][1] for r in rows]}
    g = G.pop()
    return merged if g is None else {"global_batch": g, **merged}


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
