"""The gdn_jax lm-eval model, through lm-eval itself, against the project's own code paths.

Local tasks only (tests/lm_eval_data.py); nothing downloads. A tiny random-init GDN + SWA model
in float32. References: runner.make_nll_fn (the per-token NLL behind eval.py's perplexity) on each
request's bytes, perplexity.perplexity for whole strings, and generate() for greedy continuations.
"""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` reads its config
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[lm_eval]'")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import lm_eval_data  # noqa: E402
from gdn_jax.evaluate import loading, perplexity, runner  # noqa: E402
from gdn_jax.generate import generate  # noqa: E402
from gdn_jax.inference import for_inference  # noqa: E402
from gdn_jax.lm_eval.adapter import GdnJaxLM  # noqa: E402
from gdn_jax.lm_eval.generation import cut  # noqa: E402
from gdn_jax.lm_eval.scoring import Scorer  # noqa: E402

BOS, EOS = 256, 257  # the byte tokenizer's
MAX_GEN = 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return loading.load_run(lm_eval_data.make_workdir(str(tmp_path_factory.mktemp("run"))))


def _greedy_texts(run, prompts):
    """generate() on the prompts (no padding: one call per prompt length), EOS-cut, decoded."""
    out = {}
    for length in sorted({len(p) for p in prompts}):
        same = [p for p in prompts if len(p) == length]
        ids = np.asarray([[BOS] + list(p.encode()) for p in same], np.int32)
        new = np.asarray(generate(run.model, ids, max_new_tokens=MAX_GEN, temperature=0.0,
                                  eos_id=EOS))
        for p, row in zip(same, new.tolist()):
            out[p] = run.tokenizer.decode(row[:row.index(EOS)] if EOS in row else row)
    return [out[p] for p in prompts]


def _stops(texts):
    """Two stop strings that cut these texts in different ways: one character that is a token of
    its own and appears inside some texts, and a two-character string from a text it leaves
    whole."""
    chars = sorted({c for t in texts for c in t[1:-1] if c.isascii() and c.isprintable()},
                   key=lambda c: (-sum(c in t for t in texts), c))
    one = next(c for c in chars if sum(c in t for t in texts) < len(texts) - 1)
    two = next(t[i:i + 2] for t in texts if one not in t for i in range(1, len(t) - 2)
               if all(c.isascii() and c.isprintable() for c in t[i:i + 2]))
    return [one, two]


@pytest.fixture(scope="module")
def tasks(run, tmp_path_factory):
    """Local tasks: multiple choice, rolling log-likelihood, and generation whose stop strings are
    picked from the greedy continuations themselves. Returns (dir, greedy texts, stop strings)."""
    d = str(tmp_path_factory.mktemp("tasks"))
    lm_eval_data.write_mc_task(d)
    lm_eval_data.write_rolling_task(d)
    texts = _greedy_texts(run, lm_eval_data.gen_prompts())
    stops = _stops(texts)
    lm_eval_data.write_gen_task(d, stops, MAX_GEN)
    return d, texts, stops


def _evaluate(run, tasks_dir, batch_size, **model_args):
    lm = GdnJaxLM(run=run, dtype="float32", batch_size=batch_size, log=lambda m: None,
                  **model_args)
    manager = TaskManager(include_path=tasks_dir, include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=["toy_mc", "toy_rolling", "toy_gen"],
                                   task_manager=manager, log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def nll_fn(run):
    """The per-token NLL of eval.py's perplexity; every reference call is [48, 96], one compile."""
    fn = runner.make_nll_fn(run.model)

    def padded(tokens_BxT, targets_BxT, segment_ids_BxT=None):
        B = len(tokens_BxT)
        pad = lambda a: None if a is None else np.concatenate([a, np.zeros((48 - B, 96), a.dtype)])
        return fn(pad(tokens_BxT), pad(targets_BxT), pad(segment_ids_BxT))[:B]

    return padded


@pytest.fixture(scope="module")
def results(run, tasks):
    return {b: _evaluate(run, tasks[0], b) for b in (8, 1)}


def _responses(out, task):
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_loglikelihoods_equal_the_perplexity_codes_nll(nll_fn, results):
    samples = results[8]["samples"]["toy_mc"]
    pairs = [pair for s in samples for pair in s["arguments"]]
    # One [rows, 96] pass; right padding changes no earlier position.
    ids = np.zeros((len(pairs), 97), np.int32)
    starts = []
    for r, (context, continuation) in enumerate(pairs):
        ctx = [BOS] + list(context.encode())
        row = ctx + list(continuation.encode())
        ids[r, :len(row)] = row
        starts.append((len(ctx) - 1, len(row) - 1))  # scored columns: targets past the context
    nll = nll_fn(ids[:, :-1], ids[:, 1:], np.ones_like(ids[:, 1:])).astype(np.float64)
    expected = iter([-nll[r, a:b].sum() for r, (a, b) in enumerate(starts)])
    hits = []
    for sample in samples:
        lls = [logp for ((logp, _),) in sample["resps"]]
        np.testing.assert_allclose(lls, [next(expected) for _ in lls], rtol=1e-5, atol=1e-5)
        hits.append(float(np.argmax(lls) == sample["target"]))
        assert sample["acc"] == hits[-1]
    assert results[8]["results"]["toy_mc"]["acc,none"] == pytest.approx(np.mean(hits))
    assert 0 < np.mean(hits) < 1  # both outcomes occur, so the comparison means something


def test_rolling_loglikelihood_equals_the_perplexity_of_the_string(nll_fn, results):
    for sample in results[8]["samples"]["toy_rolling"]:
        ids = np.asarray([BOS] + list(sample["arguments"][0][0].encode()), np.int32)
        # One window of 96 inputs holds the whole string (perplexity masks the padding).
        ppl = perplexity.perplexity(nll_fn, ids, np.ones_like(ids), window=96)
        assert ppl["num_tokens"] == len(ids) - 1
        np.testing.assert_allclose(sample["resps"][0][0],
                                   -ppl["nll_per_token"] * ppl["num_tokens"], rtol=1e-5)


def test_rolling_windows_as_lm_evals_hf_backend(run, nll_fn):
    """rolling_window=W scores each string in lm-eval's own rolling windows; W longer than every
    string gives the one-row numbers."""
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    texts = [d["text"] for d in lm_eval_data.rolling_docs()]
    requests = [Instance("loglikelihood_rolling", {}, (t,), 0, ("toy", i, 1))
                for i, t in enumerate(texts)]
    windowed = GdnJaxLM(run=run, batch_size=8, rolling_window=32, log=lambda m: None)
    got = windowed.loglikelihood_rolling(requests)
    for text, logp in zip(texts, got):
        pairs = [make_disjoint_window(w)
                 for w in get_rolling_token_windows(list(text.encode()), BOS, 32, 1)]
        assert len(pairs) > 2 and sum(len(b) for _, b in pairs) == len(text.encode())
        ids = np.zeros((len(pairs), 97), np.int32)
        for r, (a, b) in enumerate(pairs):
            ids[r, :len(a) + len(b)] = a + b
        nll = nll_fn(ids[:, :-1], ids[:, 1:], np.ones_like(ids[:, 1:])).astype(np.float64)
        expected = -sum(nll[r, len(a) - 1:len(a) + len(b) - 1].sum()
                        for r, (a, b) in enumerate(pairs))
        np.testing.assert_allclose(logp, expected, rtol=1e-5)
    whole = GdnJaxLM(run=run, batch_size=8, log=lambda m: None).loglikelihood_rolling(requests)
    wide = GdnJaxLM(run=run, batch_size=8, rolling_window=200, log=lambda m: None)
    assert wide.loglikelihood_rolling(requests) == whole


def test_generate_until_is_greedy_generation_cut_at_the_stop_strings(results, tasks):
    _, texts, stops = tasks
    got = [r[0][0] for r in _responses(results[8], "toy_gen")]
    assert got == [cut(t, stops) for t in texts]
    assert any(stops[0] in t for t in texts) and any(stops[1] in t for t in texts)
    assert any(g == t for g, t in zip(got, texts))  # some rows are not cut at all


def test_batch_size_does_not_change_any_number(results):
    for task in ("toy_mc", "toy_rolling", "toy_gen"):
        assert _responses(results[1], task) == _responses(results[8], task), task
    assert results[1]["results"] == results[8]["results"]


def test_rows_past_max_length_continue_through_the_recurrence(run):
    """max_length 16: the prefill reads 16 inputs and decode steps carry the GDN state and the
    SWA window (16) over the rest; against one parallel pass over each whole row."""
    model = for_inference(run.model, dtype="float32")
    docs = [[BOS] + list(d["text"].encode()) for d in lm_eval_data.rolling_docs()]
    rows = [(ids, s) for ids, s in zip(docs, (1, 10, 16, 17, 60))]
    rows += [(ids, len(ids) - 1) for ids in docs]  # one token each: greedy or not
    whole = Scorer(model, batch_size=8, max_length=None).score(rows)
    recurrent = Scorer(model, batch_size=8, max_length=16)
    stepped = recurrent.score(rows)
    assert recurrent.long_rows == len(rows)
    np.testing.assert_allclose([x[0] for x in stepped], [x[0] for x in whole], rtol=1e-5)
    assert [x[1] for x in stepped] == [x[1] for x in whole]
