"""lm-eval request strings -> token ids, with the run's own tokenizer and document framing.

A request is scored as the model saw documents in training:

    context c, continuation y:   row = P + enc(c) + enc(y)      scored: the enc(y) tokens
    empty context:               row = [p] + enc(y)              scored: the enc(y) tokens
    rolling (whole string s):    row = [p] + enc(s)              scored: the enc(s) tokens
    generation prompt c:         P + enc(c), or [p] when that is empty

P is [BOS] when the run put BOS before each document (data.add_bos and the tokenizer has one), else
[]. p, the prefix of a row that has no context, is BOS under the same condition, else EOS (the
token before a document in an unframed stream); a tokenizer with neither cannot score such rows.
As lm-eval's own backends do, trailing whitespace of a context moves to its continuation (so " a"
is scored as one word), and enc(y) is taken as enc(c + y) past its first len(enc(c)) ids, so the
ids scored are those the model would read for the whole text.
"""

from __future__ import annotations

from typing import Sequence

from gdn_jax.data.tokenizers import Tokenizer


class RequestError(ValueError):
    """A request the model cannot serve; the message names the task."""


def task_error(task: str | None, message: str) -> RequestError:
    return RequestError(f"lm-eval task {task or '?'!r}: {message}")


class Encoder:
    """Encodes request strings for one run: `tokenizer`, and whether documents start with BOS."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool):
        self.tokenizer = tokenizer
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
        self.context_prefix: list[int] = [bos] if add_bos and bos is not None else []
        self.row_prefix: int | None = bos if add_bos and bos is not None else eos

    def prefix(self, task: str | None) -> list[int]:
        if self.row_prefix is None:
            raise task_error(task, f"an empty context needs a BOS or EOS token to condition on, "
                                   f"and the tokenizer {self.tokenizer!r} has neither")
        return [self.row_prefix]

    def pair(self, context: str, continuation: str, task: str | None = None
             ) -> tuple[list[int], int]:
        """(row ids, number of context ids): the continuation is row[n_context:]."""
        if context == "":
            return self.prefix(task) + self.tokenizer.encode(continuation), 1
        stripped = context.rstrip()
        if stripped != context:
            context, continuation = stripped, context[len(stripped):] + continuation
        if context == "":  # the context was only whitespace
            return self.prefix(task) + self.tokenizer.encode(continuation), 1
        ctx = self.tokenizer.encode(context)
        whole = self.tokenizer.encode(context + continuation)
        return self.context_prefix + whole, len(self.context_prefix) + len(ctx)

    def rolling(self, text: str, task: str | None = None) -> list[int]:
        """Row ids whose every token after the first is scored."""
        return self.prefix(task) + self.tokenizer.encode(text)

    def prompt(self, context: str, task: str | None = None) -> list[int]:
        ids = self.context_prefix + self.tokenizer.encode(context)
        return ids if ids else self.prefix(task)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)
