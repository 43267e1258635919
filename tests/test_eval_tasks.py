"""Evaluation task generators and scorers: MQAR, S-NIAH, perplexity windows (no model needed)."""

import math

import numpy as np
import pytest

from gdn_jax.data.tokenizers import ByteTokenizer as ByteTok
from gdn_jax.evaluate import mqar, niah, perplexity

ESSAY = " ".join(
    f"Sentence number {i} talks about {w} and then stops."
    for i, w in enumerate(
        ["rivers", "mountains", "clouds", "engines", "letters", "gardens", "storms"] * 40
    )
)


# ---------------------------------------------------------------------------------------------- MQAR


def test_mqar_deterministic_and_seed_dependent():
    cfg = mqar.MQARConfig(seq_len=128, num_kv_pairs=8, vocab_size=256)
    a = mqar.mqar_batch(cfg, batch_size=4, seed=3)
    b = mqar.mqar_batch(cfg, batch_size=4, seed=3)
    c = mqar.mqar_batch(cfg, batch_size=4, seed=4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert (a["tokens"] != c["tokens"]).mean() > 0.5
    stream = mqar.mqar_batches(cfg, batch_size=4, seed=3, start=2)
    np.testing.assert_array_equal(
        next(stream)["tokens"], mqar.mqar_batch(cfg, batch_size=4, seed=(3, 2))["tokens"]
    )


def test_mqar_structure():
    cfg = mqar.MQARConfig(seq_len=128, num_kv_pairs=8, vocab_size=256)
    batch = mqar.mqar_batch(cfg, batch_size=16, seed=0)
    toks, tg, mask = batch["tokens"], batch["targets"], batch["loss_mask"]
    assert toks.min() >= 0 and toks.max() < 256
    assert mask.sum(axis=1).tolist() == [8] * 16
    for row, trow, mrow in zip(toks, tg, mask):
        keys, values = row[0:16:2], row[1:16:2]
        assert len(set(keys.tolist())) == 8 and keys.min() >= 1 and keys.max() < 128
        assert values.min() >= 128
        q = np.flatnonzero(mrow)
        assert (q >= 16).all() and (q % 2 == 0).all()
        assert sorted(row[q].tolist()) == sorted(keys.tolist())  # each key queried once
        table = dict(zip(keys.tolist(), values.tolist()))
        assert [table[k] for k in row[q]] == trow[q].tolist()
    # Off the queries, targets are the next token.
    np.testing.assert_array_equal(
        np.where(mask[:, :-1] > 0, 0, tg[:, :-1]), np.where(mask[:, :-1] > 0, 0, toks[:, 1:])
    )


def test_mqar_perfect_and_constant_predictors():
    cfg = mqar.MQARConfig(seq_len=256, num_kv_pairs=16, vocab_size=64)
    batch = mqar.mqar_batch(cfg, batch_size=256, seed=1)
    perfect = mqar.mqar_accuracy(
        mqar.lookup_predictions(batch["tokens"], 16), batch["targets"], batch["loss_mask"]
    )
    assert perfect["accuracy"] == 1.0 and perfect["sequence_accuracy"] == 1.0
    assert perfect["num_queries"] == 256 * 16
    constant = mqar.mqar_accuracy(
        np.full_like(batch["tokens"], 40), batch["targets"], batch["loss_mask"]
    )
    chance = mqar.chance_accuracy(cfg)  # 1/32
    assert abs(constant["accuracy"] - chance) < 0.012  # ~4 binomial std devs with 4096 queries
    assert constant["sequence_accuracy"] == 0.0


def test_mqar_rejects_bad_config():
    with pytest.raises(ValueError, match="num_kv_pairs"):
        mqar.mqar_batch(mqar.MQARConfig(seq_len=32, num_kv_pairs=16), batch_size=1, seed=0)


# -------------------------------------------------------------------------------------------- S-NIAH


@pytest.mark.parametrize("task", niah.TASKS)
def test_niah_deterministic_and_exact_length(task):
    tok = ByteTok()
    a = niah.make_sample(task, tok, length=700, depth=0.4, seed=5, essay_text=ESSAY)
    b = niah.make_sample(task, tok, length=700, depth=0.4, seed=5, essay_text=ESSAY)
    c = niah.make_sample(task, tok, length=700, depth=0.4, seed=6, essay_text=ESSAY)
    np.testing.assert_array_equal(a.prompt_tokens, b.prompt_tokens)
    assert a.answer == b.answer and a.answer != c.answer
    assert len(a.prompt_tokens) == 700
    text = tok.decode(a.prompt_tokens)
    assert text.count(a.answer) == 1
    assert text.endswith(f"for {a.key} mentioned in the provided text is")
    if task == "s_niah_3":
        assert len(a.answer) == 36 and a.answer.count("-") == 4
    else:
        assert len(a.answer) == 7 and a.answer.isdigit()
    if task == "s_niah_1":
        assert "The grass is green. The sky is blue." in text


@pytest.mark.parametrize("task", niah.TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_niah_needle_at_requested_depth(task, depth):
    tok = ByteTok()
    s = niah.make_sample(task, tok, length=2000, depth=depth, seed=0, essay_text=ESSAY)
    _, needle, _ = niah.prompt_parts(task, s.key, s.answer)
    found = tok.decode(s.prompt_tokens[s.needle_start : s.needle_start + len(needle)])
    assert found == needle
    # The needle sits at a sentence boundary: at most one haystack unit (<= 90 bytes) from the target.
    target = s.haystack_start + depth * s.haystack_tokens
    assert abs(s.needle_start - target) <= 90 / 2 + 1, (s.needle_start, target)
    before = tok.decode(s.prompt_tokens[: s.needle_start])
    assert before.endswith("\n") or before.endswith(". ")


def test_niah_needs_room_and_text():
    with pytest.raises(ValueError, match="no room"):
        niah.make_sample("s_niah_1", ByteTok(), length=200, depth=0.5, seed=0)
    with pytest.raises(ValueError, match="natural text"):
        niah.make_sample("s_niah_2", ByteTok(), length=1000, depth=0.5, seed=0)
    with pytest.raises(ValueError, match="unknown task"):
        niah.make_sample("s_niah_9", ByteTok(), length=1000, depth=0.5, seed=0)


def test_niah_scorer():
    assert niah.score_answer(" 4821937.\nWhat", "4821937") == {"exact_match": 1.0, "contains": 1.0}
    assert niah.score_answer(" 482193", "4821937")["exact_match"] == 0.0
    assert niah.score_answer(" 48219370", "4821937")["exact_match"] == 0.0
    assert niah.score_answer(" the number 4821937", "4821937") == {
        "exact_match": 0.0,
        "contains": 1.0,
    }
    u = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
    assert niah.score_answer(f' "{u}". And', u)["exact_match"] == 1.0
    assert niah.score_answer(u[:-1] + "1", u)["exact_match"] == 0.0
    assert niah.score_answer("", u)["exact_match"] == 0.0


# ---------------------------------------------------------------------------------------- Perplexity


def _bigram_nll_fn(logp_VxV):
    def nll_fn(inputs, targets, segs):
        return -logp_VxV[inputs, targets]

    return nll_fn


@pytest.mark.parametrize("window,batch", [(7, 3), (64, 2), (1000, 1)])
def test_perplexity_windows_score_each_token_once(window, batch):
    rng = np.random.default_rng(0)
    V = 11
    logits = rng.normal(size=(V, V))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    docs = [rng.integers(0, V, size=n) for n in (50, 1, 93, 20)]
    tokens, segs = perplexity.pack_documents(docs)
    out = perplexity.perplexity(_bigram_nll_fn(logp), tokens, segs, window=window, batch_size=batch)
    # Independent: every within-document pair of consecutive tokens, once.
    nll = [-logp[d[i], d[i + 1]] for d in docs for i in range(len(d) - 1)]
    assert out["num_tokens"] == len(nll) == 49 + 92 + 19
    assert math.isclose(out["perplexity"], math.exp(np.mean(nll)), rel_tol=1e-9)


def test_extrapolation_buckets_and_rows():
    loss = np.arange(16, dtype=float)
    s = perplexity.extrapolation_summary(loss, train_seq_len=4)
    assert s["log2_bucket_edges"] == [0, 1, 2, 4, 8, 16]
    assert s["log2_bucket_mean_loss"] == [0.0, 1.0, 2.5, 5.5, 11.5]
    assert s["train_multiple_edges"] == [0, 4, 8, 16]
    assert s["train_multiple_mean_loss"] == [1.5, 5.5, 11.5]
    assert s["mean_loss_beyond_train_len"] == 9.5
    rows = perplexity.sequences_from_stream(np.arange(100), seq_len=9, num_seqs=4)
    assert rows.shape == (4, 10) and rows[0, 0] == 0 and rows[-1, -1] == 99
    np.testing.assert_array_equal(np.diff(rows, axis=1), 1)


def test_extrapolation_rows_prefer_whole_documents():
    docs = [list(range(100 * i, 100 * i + n)) for i, n in enumerate((30, 80, 60, 90))]
    rows, kind = perplexity.extrapolation_rows(docs, seq_len=49, num_seqs=3)
    assert kind == "documents"
    assert [r[0] for r in rows] == [300, 100, 200]  # the longest documents, from their start
    rows, kind = perplexity.extrapolation_rows(docs, seq_len=84, num_seqs=3)
    assert kind == "stream" and rows.shape == (3, 85)
    rows, kind = perplexity.extrapolation_rows([[1, 2, 3]], seq_len=7, num_seqs=2)
    assert kind == "stream, repeated" and rows[0].tolist() == [1, 2, 3, 1, 2, 3, 1, 2]


def test_docstring_prose_is_sentences():
    src = '''
def f():
    """Return the thing.

    The thing is computed from the inputs in a careful way, which this paragraph explains at
    length so that it reads as prose. It has two sentences.

    >>> f()
    3
    """
    return 3
'''
    text = niah.prose_from_python([src, "def broken(:"], min_chars=20)
    assert text == (
        "The thing is computed from the inputs in a careful way, which this paragraph "
        "explains at length so that it reads as prose. It has two sentences."
    )
