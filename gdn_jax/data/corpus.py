"""The embedded default corpus: the Python standard library's own `.py` sources.

Every CPython install ships them, so the default run needs no download. A file is one document.
Documents are ordered by their path relative to the stdlib root; a file belongs to the held-out split
when crc32(relative path) % 20 == 0 (about 5%), so the split does not depend on which other files
exist. Test suites, the IDLE/tkinter GUI code and site-packages are left out. The corpus is whatever
the running interpreter ships: Python 3.11 and 3.12 give slightly different corpora.
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from typing import Sequence

_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "lib2to3",
        "ensurepip",
        "venv",
    }
)
HELDOUT_MODULUS = 20


@functools.lru_cache(maxsize=None)
def _stdlib_files() -> tuple[str, ...]:
    root = sysconfig.get_paths()["stdlib"]
    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                rel_paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    if not rel_paths:
        raise FileNotFoundError(
            f"no .py files under the stdlib root {root}; the embedded corpus "
            "needs a CPython install with its sources"
        )
    return tuple(sorted(rel_paths))


def _in_heldout(rel_path: str) -> bool:
    return zlib.crc32(rel_path.encode()) % HELDOUT_MODULUS == 0


class EmbeddedDocuments(Sequence[str]):
    """Random-access, lazily read stdlib sources of one split; `docs[i]` is the text of file i."""

    def __init__(self, split: str = "train"):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.split = split
        self.root = sysconfig.get_paths()["stdlib"]
        want_heldout = split == "heldout"
        self.paths = tuple(p for p in _stdlib_files() if _in_heldout(p) == want_heldout)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        with open(
            os.path.join(self.root, self.paths[index]), encoding="utf-8", errors="replace"
        ) as f:
            return f.read()

    def __repr__(self) -> str:
        return f"EmbeddedDocuments(split={self.split!r}, n={len(self)}, root={self.root!r})"


def embedded_documents(split: str = "train") -> EmbeddedDocuments:
    """The embedded corpus, `split` = "train" or "heldout" (disjoint; ~95% / ~5% of files)."""
    return EmbeddedDocuments(split)
