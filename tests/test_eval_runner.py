"""The evaluation runner against a real (randomly initialised, tiny) LM and oracle stand-ins."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.model import get_model_config
from gdn_jax.data.tokenizers import ByteTokenizer
from gdn_jax.evaluate import mqar, niah, runner
from gdn_jax.model import LM


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = get_model_config("tiny", vocab_size=258, dtype="float32")
    return LM(cfg, rngs=nnx.Rngs(0))


def test_perplexity_matches_direct_log_softmax(tiny_lm):
    """One window holds both packed documents; the reference scores each document alone."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=60).tolist() for _ in range(2)]
    out = runner.run_perplexity(
        runner.make_nll_fn(tiny_lm),
        docs,
        window=128,
        batch_size=1,
        max_tokens=None,
        source="test",
        log=lambda _: None,
    )
    d = np.asarray(docs, np.int32)
    logits = nnx.jit(lambda m, x: m(x))(tiny_lm, jnp.asarray(d[:, :-1]))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    nll = -np.take_along_axis(logp, d[:, 1:, None], axis=-1)
    assert out["num_tokens"] == nll.size == 2 * 59
    assert abs(out["nll_per_token"] - math.log(258)) < 0.5  # random init: near uniform
    assert math.isclose(out["perplexity"], math.exp(np.mean(nll)), rel_tol=1e-5)


def test_segment_ids_isolate_documents(tiny_lm):
    """Packed scoring equals scoring each document alone (no state leaks across documents)."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 256, size=n).tolist() for n in (20, 30)]
    nll_fn = runner.make_nll_fn(tiny_lm)
    packed = runner.run_perplexity(
        nll_fn, docs, window=64, batch_size=1, max_tokens=None, source="t", log=lambda _: None
    )
    alone = [
        runner.run_perplexity(
            nll_fn, [d], window=64, batch_size=1, max_tokens=None, source="t", log=lambda _: None
        )
        for d in docs
    ]
    total = sum(a["nll_per_token"] * a["num_tokens"] for a in alone)
    assert math.isclose(packed["nll_per_token"], total / (19 + 29), rel_tol=1e-5)


def test_mqar_runner_with_oracle_and_model(tiny_lm, tmp_path):
    oracle = lambda tokens_BxT: mqar.lookup_predictions(tokens_BxT, 8)
    out = runner.run_mqar(
        oracle,
        seq_len=64,
        vocab_size=128,
        kv_pairs=[8],
        num_examples=20,
        batch_size=8,
        seed=0,
        out_dir=str(tmp_path),
        log=lambda _: None,
    )
    assert out["results"][0]["accuracy"] == 1.0 and out["results"][0]["num_queries"] == 20 * 8
    model = runner.run_mqar(
        runner.make_argmax_fn(tiny_lm),
        seq_len=64,
        vocab_size=128,
        kv_pairs=[4, 8],
        num_examples=16,
        batch_size=8,
        seed=0,
        out_dir=str(tmp_path),
        log=lambda _: None,
    )
    for r in model["results"]:  # an untrained model is near chance (1/64)
        assert 0.0 <= r["accuracy"] < 0.2
    assert os.path.getsize(tmp_path / "mqar.png") > 1000


def test_niah_runner_with_oracle_and_wrong_generator(tmp_path):
    tok = ByteTokenizer()
    essay = "Rivers run to the sea. Mountains stand tall. " * 200

    def oracle(prompts_BxP, max_new):  # reads the value back out of the prompt's needle
        out = []
        for p in prompts_BxP:
            text = tok.decode(p)
            value = text.split(" is: ")[1].split(".\n")[0].split(". ")[0]
            out.append(tok.encode((" " + value + ".").ljust(max_new))[:max_new])
        return np.asarray(out)

    def wrong(prompts_BxP, max_new):
        return np.asarray([tok.encode(" 1234567.".ljust(max_new))] * len(prompts_BxP))

    kw = dict(
        tasks=niah.TASKS,
        lengths=[400, 600],
        depths=[0.0, 0.5, 1.0],
        samples=2,
        batch_size=4,
        essay_text=essay,
        seed=0,
        out_dir=str(tmp_path),
        log=lambda _: None,
        prefix_ids=[tok.bos_id],
    )
    good = runner.run_niah(oracle, tok, **kw)
    bad = runner.run_niah(wrong, tok, **kw)
    for task in niah.TASKS:
        assert np.array_equal(good["tasks"][task]["exact_match"], np.ones((3, 2)))
        assert np.array_equal(bad["tasks"][task]["exact_match"], np.zeros((3, 2)))
        png = tmp_path / f"niah_{task}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(good)


def test_extrapolation_runner(tiny_lm, tmp_path):
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 256, size=200).tolist() for _ in range(3)]
    out = runner.run_extrapolation(
        runner.make_nll_fn(tiny_lm),
        docs,
        train_seq_len=32,
        seq_len=128,
        num_seqs=3,
        out_dir=str(tmp_path),
        log=lambda _: None,
    )
    assert out["rows_from"] == "documents"
    assert out["train_multiple_edges"] == [0, 32, 64, 128]
    loss = np.load(tmp_path / "extrapolation_loss.npy")
    assert loss.shape == (128,) and np.all(np.isfinite(loss))
    assert math.isclose(out["log2_bucket_mean_loss"][-1], loss[64:].mean(), rel_tol=1e-5)
    assert (tmp_path / "extrapolation.png").stat().st_size > 1000
