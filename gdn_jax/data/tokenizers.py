"""Tokenizers behind one small interface: UTF-8 bytes (default), SentencePiece, HF tokenizer.json.

    tok = get_tokenizer("bytes" | "path/to/spm.model" | "path/to/tokenizer.json")
    ids = tok.encode(text)          # list[int], no specials
    text = tok.decode(ids)          # specials dropped
    tok.vocab_size, tok.bos_id, tok.eos_id   # bos/eos may be None

The byte tokenizer maps byte b to id b, and adds BOS = 256 and EOS = 257: vocab_size 258. Padding
needs no id of its own: padded slots have segment id 0 and never enter the loss.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255 are bytes, 256 is BOS, 257 is EOS."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A SentencePiece `.model` file."""

    def __init__(self, path: str):
        import sentencepiece as spm  # optional dependency: pip install gdn-jax[tokenizers]

        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r})"


_HF_BOS = ("<s>", "<bos>", "<|begin_of_text|>", "[BOS]")
_HF_EOS = ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "[EOS]")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library, no transformers needed).

    BOS/EOS are the first of the usual names found in the vocabulary, or None.
    """

    def __init__(self, path: str):
        import tokenizers  # optional dependency: pip install gdn-jax[tokenizers]

        self.path = path
        self._tok = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = next(
            (self._tok.token_to_id(t) for t in _HF_BOS if self._tok.token_to_id(t) is not None),
            None,
        )
        self.eos_id = next(
            (self._tok.token_to_id(t) for t in _HF_EOS if self._tok.token_to_id(t) is not None),
            None,
        )

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def get_tokenizer(spec: str) -> Tokenizer:
    """ "bytes", a SentencePiece `.model` path, or a HF `tokenizer.json` path."""
    if spec == "bytes":
        return ByteTokenizer()
    if not os.path.exists(spec):
        raise FileNotFoundError(f"tokenizer {spec!r}: not 'bytes' and no such file")
    if spec.endswith(".json"):
        return HFTokenizer(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise ValueError(
        f"tokenizer {spec!r}: expected 'bytes', a SentencePiece .model or a HF " "tokenizer.json"
    )
