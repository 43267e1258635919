"""Data sources, looked up by name in a registry.

Two kinds:
- document sources: `fn(cfg: DataConfig, split) -> Sequence[str]`, random access (grain needs it);
  the pipeline tokenizes, shuffles and packs them.
- batch sources: `fn(cfg: DataConfig, *, global_batch, seed) -> BatchSource`, synthetic tasks that
  make whole rows themselves (no tokenizer, no packing), e.g. MQAR.

Add one with `@register_document_source("name")` or `@register_batch_source("name")`; select it
with `data.source = "name"`.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Callable, Protocol, Sequence

import numpy as np

from gdn_jax.data import corpus

DOCUMENT_SOURCES: dict[str, Callable] = {}
BATCH_SOURCES: dict[str, Callable] = {}


def register_document_source(name: str):
    def deco(fn):
        DOCUMENT_SOURCES[name] = fn
        return fn

    return deco


def register_batch_source(name: str):
    def deco(fn):
        BATCH_SOURCES[name] = fn
        return fn

    return deco


def source_names() -> list[str]:
    return sorted([*DOCUMENT_SOURCES, *BATCH_SOURCES])


def _expand(patterns: Sequence[str], what: str) -> list[str]:
    files = []
    for p in patterns:
        hits = sorted(glob.glob(os.path.expanduser(p)))
        if not hits:
            raise FileNotFoundError(f"{what}: no file matches {p!r}")
        files.extend(hits)
    if not files:
        raise ValueError(f"{what}: data.paths (or data.heldout_paths) is empty")
    return files


def _split_paths(cfg, split: str) -> tuple[str, ...]:
    if split == "train":
        return cfg.paths
    if split == "heldout":
        return cfg.heldout_paths
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


@register_document_source("embedded")
def embedded(cfg, split: str = "train") -> Sequence[str]:
    del cfg
    return corpus.embedded_documents(split)


class TextFiles(Sequence[str]):
    """One document per text file."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with open(self.files[i], encoding="utf-8", errors="replace") as f:
            return f.read()


@register_document_source("text")
def text_files(cfg, split: str = "train") -> Sequence[str]:
    return TextFiles(_expand(_split_paths(cfg, split), "text source"))


class JsonlDocuments(Sequence[str]):
    """One document per line of JSON-lines files (`field` of each object); line offsets indexed once."""

    def __init__(self, files: Sequence[str], field: str):
        self.field = field
        self.index: list[tuple[str, int]] = []
        for path in files:
            with open(path, "rb") as f:
                offset = 0
                for line in f:
                    if line.strip():
                        self.index.append((path, offset))
                    offset += len(line)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        path, offset = self.index[i]
        with open(path, "rb") as f:
            f.seek(offset)
            record = json.loads(f.readline())
        if self.field not in record:
            raise KeyError(f"{path}@{offset}: record has no field {self.field!r} (data.text_field)")
        return record[self.field]


@register_document_source("jsonl")
def jsonl(cfg, split: str = "train") -> Sequence[str]:
    return JsonlDocuments(_expand(_split_paths(cfg, split), "jsonl source"), cfg.text_field)


class ArrayRecordDocuments(Sequence[str]):
    """ArrayRecord files whose records are UTF-8 text, or JSON objects when they start with '{'."""

    def __init__(self, files: Sequence[str], field: str):
        import grain

        self.field = field
        self._source = grain.sources.ArrayRecordDataSource(list(files))

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        record = self._source[i]
        text = record.decode("utf-8", errors="replace") if isinstance(record, bytes) else record
        if text.lstrip().startswith("{"):
            return json.loads(text)[self.field]
        return text


@register_document_source("arrayrecord")
def arrayrecord(cfg, split: str = "train") -> Sequence[str]:
    return ArrayRecordDocuments(
        _expand(_split_paths(cfg, split), "arrayrecord source"), cfg.text_field
    )


class BatchSource(Protocol):
    """Makes global batch `index` (numpy dict of [global_batch, T] arrays), deterministically."""

    def __call__(self, index: int) -> dict[str, np.ndarray]: ...


@register_batch_source("mqar")
def mqar(cfg, *, global_batch: int, seed: int) -> BatchSource:
    """MQAR rows from gdn_jax.evaluate.mqar; `data.options` holds MQARConfig fields except seq_len.

    Rows are `seq_len` long: the generator's tokens/targets/loss_mask/segment_ids as they are.
    """
    from gdn_jax.evaluate import mqar as mqar_lib  # the evaluation package owns the task

    mqar_cfg = mqar_lib.MQARConfig(seq_len=cfg.seq_len, **cfg.options)
    mqar_cfg.validate()

    def make(index: int) -> dict[str, np.ndarray]:
        batch = mqar_lib.mqar_batch(mqar_cfg, batch_size=global_batch, seed=(seed, index))
        T = batch["tokens"].shape[1]
        batch["positions"] = np.broadcast_to(np.arange(T, dtype=np.int32), batch["tokens"].shape)
        return batch

    return make
