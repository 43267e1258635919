"""Single needle in a haystack (S-NIAH-1/2/3), after RULER (Hsieh et al., 2024).

    sample = make_sample(task, tokenizer, length=L, depth=d, seed=s, essay_text=text)
    ok = score_answer(generated_text, sample.answer)

The three tasks follow RULER's `niah_single_{1,2,3}` configurations:

  task       haystack                                   key          value (answer)
  s_niah_1   "The grass is green. The sky is blue. ..."  adj-noun     7-digit number (pass key)
             repeated, one copy a line
  s_niah_2   natural text (sentences of an essay)       adj-noun     7-digit number
  s_niah_3   natural text                                adj-noun     UUID (version 4)

The needle "One of the special magic {numbers|uuids} for {key} is: {value}." goes in at a sentence
boundary, the one nearest to depth·(haystack tokens) from the haystack's start (depth 0 = first
thing after the instruction, 1 = last thing before the question). The prompt is RULER's base template
for one needle and one query:

  A special magic {number|uuid} is hidden within the following text. Make sure to memorize it.
  I will quiz you about the {number|uuid} afterwards.
  {haystack with the needle}
  What is the special magic {number|uuid} for {key} mentioned in the provided text? The special
  magic {number|uuid} for {key} mentioned in the provided text is

The prompt is built in token space and is exactly `length` tokens long (the haystack's first
sentence is cut at its front to fit), which lets one compiled generation serve every sample of a
length. The model continues the prompt greedily; the answer is the first whitespace-delimited word
of the continuation, stripped of surrounding punctuation, and scores 1 only if it equals the value
exactly (RULER's own metric, "value is a substring of the output", is reported beside it).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import uuid
from typing import Protocol, Sequence

import numpy as np

TASKS = ("s_niah_1", "s_niah_2", "s_niah_3")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_ADJECTIVES = (
    "amber",
    "brave",
    "calm",
    "dusty",
    "eager",
    "faint",
    "gentle",
    "hollow",
    "icy",
    "jolly",
    "keen",
    "lively",
    "misty",
    "narrow",
    "odd",
    "pale",
    "quiet",
    "rapid",
    "silent",
    "tidy",
    "urban",
    "vivid",
    "wary",
    "young",
    "zesty",
    "bold",
    "crisp",
    "deep",
    "early",
    "fresh",
    "grand",
    "humble",
    "ivory",
    "jagged",
    "kind",
    "lucky",
    "mellow",
    "noble",
    "olive",
    "proud",
)
_NOUNS = (
    "anchor",
    "badger",
    "canyon",
    "dolphin",
    "engine",
    "falcon",
    "garden",
    "harbor",
    "island",
    "jacket",
    "kettle",
    "lantern",
    "meadow",
    "needle",
    "orchard",
    "pepper",
    "quartz",
    "river",
    "saddle",
    "tunnel",
    "umbrella",
    "valley",
    "walnut",
    "yogurt",
    "zebra",
    "bridge",
    "candle",
    "desert",
    "ember",
    "forest",
    "glacier",
    "hammer",
    "igloo",
    "jungle",
    "kitten",
    "ladder",
    "mirror",
    "nickel",
    "otter",
    "pillow",
)


class Tokenizer(Protocol):
    def encode(self, text: str) -> Sequence[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class NiahSample:
    task: str
    length: int  # prompt length in tokens
    depth: float  # requested needle depth in [0, 1]
    prompt_tokens: np.ndarray  # int32 [length]
    key: str
    answer: str
    needle_start: int  # token index of the needle's first token in the prompt
    haystack_start: int  # token index where the haystack (with the needle) begins
    haystack_tokens: int  # haystack tokens, the needle not counted


def prose_from_python(docs: Sequence[str], min_chars: int = 200) -> str:
    """English prose from Python sources: the paragraphs of their docstrings that read as sentences.

    The embedded corpus is the standard library's source, so its natural text lives in docstrings;
    doctest lines, parameter tables and code-like paragraphs are dropped.
    """
    paragraphs = []
    for doc in docs:
        try:
            tree = ast.parse(doc)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            ):
                continue
            text = ast.get_docstring(node)
            if not text or len(text) < min_chars:
                continue
            for para in re.split(r"\n\s*\n", text):
                flat = re.sub(r"\s+", " ", para).strip()
                if not flat.endswith(".") or ">>>" in flat or len(flat) < 40:
                    continue
                prose = sum(c.isalpha() or c in " ,.;'-" for c in flat) / len(flat)
                if prose > 0.9:
                    paragraphs.append(flat)
    return " ".join(paragraphs)


def _value_kind(task: str) -> str:
    return "uuid" if task == "s_niah_3" else "number"


def split_sentences(text: str) -> list[str]:
    """Sentences of running text: split after . ! or ? that is followed by whitespace."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?]) ", flat) if s]


def _random_value(rng: np.random.Generator, kind: str) -> str:
    if kind == "uuid":
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))
    return str(int(rng.integers(10**6, 10**7)))


def prompt_parts(task: str, key: str, value: str) -> tuple[str, str, str]:
    """(instruction, needle, question) text of one sample."""
    kind = _value_kind(task)
    head = (
        f"A special magic {kind} is hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind} afterwards.\n"
    )
    needle = f"One of the special magic {kind}s for {key} is: {value}."
    question = (
        f"\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
        f"The special magic {kind} for {key} mentioned in the provided text is"
    )
    return head, needle, question


def _haystack_units(task: str, rng: np.random.Generator, essay_sentences: Sequence[str] | None):
    """Endless generator of haystack text units, each ending with its separator."""
    if task == "s_niah_1":
        while True:
            yield NOISE + "\n"
    if not essay_sentences:
        raise ValueError(f"{task} needs natural text: pass essay_text")
    i = int(rng.integers(0, len(essay_sentences)))  # each sample starts somewhere else in the text
    while True:
        yield essay_sentences[i % len(essay_sentences)] + " "
        i += 1


def make_sample(
    task: str,
    tokenizer: Tokenizer,
    *,
    length: int,
    depth: float,
    seed: int,
    essay_text: str | Sequence[str] | None = None,
    prefix_ids: Sequence[int] = (),
) -> NiahSample:
    """One S-NIAH prompt of exactly `length` tokens, the needle at `depth`; deterministic in seed.

    `prefix_ids` go first (a BOS token, when the model was trained with one); they count in `length`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = np.random.default_rng([seed, TASKS.index(task), length, int(round(depth * 1000))])
    key = f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}"
    value = _random_value(rng, "uuid" if task == "s_niah_3" else "number")
    head, needle, question = prompt_parts(task, key, value)
    sep = "\n" if task == "s_niah_1" else " "
    head_ids = list(prefix_ids) + list(tokenizer.encode(head))
    needle_ids = list(tokenizer.encode(needle + sep))
    question_ids = list(tokenizer.encode(question))
    budget = length - len(head_ids) - len(needle_ids) - len(question_ids)
    if budget < 1:
        raise ValueError(
            f"length={length} leaves no room for a haystack (needs > " f"{length - budget} tokens)"
        )

    if isinstance(essay_text, str):
        sentences = split_sentences(essay_text)
    else:
        sentences = [s for doc in (essay_text or ()) for s in split_sentences(doc)]
    hay_ids: list[int] = []
    ends = []
    for unit in _haystack_units(task, rng, sentences):
        hay_ids.extend(tokenizer.encode(unit))
        ends.append(len(hay_ids))
        if len(hay_ids) >= budget:
            break
    # Cut the surplus off the front, so that only the first unit is a fragment and the haystack
    # ends on a whole sentence: depth 1 then puts the needle right before the question.
    excess = len(hay_ids) - budget
    hay_ids = hay_ids[excess:]
    bounds = np.asarray([0] + [e - excess for e in ends if e > excess])
    cut = int(bounds[np.argmin(np.abs(bounds - depth * budget))])

    ids = head_ids + hay_ids[:cut] + needle_ids + hay_ids[cut:] + question_ids
    assert len(ids) == length
    return NiahSample(
        task=task,
        length=length,
        depth=float(depth),
        prompt_tokens=np.asarray(ids, np.int32),
        key=key,
        answer=value,
        needle_start=len(head_ids) + cut,
        haystack_start=len(head_ids),
        haystack_tokens=budget,
    )


def extract_answer(continuation: str) -> str:
    """The first word of a continuation, without surrounding punctuation or quotes."""
    words = continuation.split()
    return words[0].strip(".,;:!?\"'()[]") if words else ""


def score_answer(continuation: str, answer: str) -> dict:
    """{"exact_match": 0/1 on the extracted answer, "contains": 0/1, RULER's substring match}."""
    return {
        "exact_match": float(extract_answer(continuation) == answer),
        "contains": float(answer.lower() in continuation.lower()),
    }


def answer_budget(tokenizer: Tokenizer, sample: NiahSample) -> int:
    """New tokens to generate: the answer with its leading space, plus a little slack."""
    return len(tokenizer.encode(" " + sample.answer + ".")) + 2
