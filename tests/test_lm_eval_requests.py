"""Request strings -> ids (encoding.py), generation options (generation.py), length buckets: the
rules the lm-eval model applies before any model runs."""

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[lm_eval]'")

from lm_eval.api.instance import Instance  # noqa: E402

from gdn_jax.data.tokenizers import ByteTokenizer  # noqa: E402
from gdn_jax.lm_eval.adapter import GdnJaxLM  # noqa: E402
from gdn_jax.lm_eval.encoding import Encoder, RequestError  # noqa: E402
from gdn_jax.lm_eval.generation import Options, cut, parse_options  # noqa: E402
from gdn_jax.lm_eval.scoring import bucket  # noqa: E402

BOS, EOS = 256, 257


class NoSpecials(ByteTokenizer):
    bos_id = eos_id = None


def ids(text):
    return list(text.encode())


def test_pairs_are_framed_as_training_documents():
    enc = Encoder(ByteTokenizer(), add_bos=True)
    # The context's trailing space moves to the continuation; BOS starts the row.
    assert enc.pair("Q: a?\nA: ", "yes") == ([BOS] + ids("Q: a?\nA: yes"), 1 + len("Q: a?\nA:"))
    assert enc.pair("", "yes") == ([BOS] + ids("yes"), 1)
    assert enc.pair("  ", "yes") == ([BOS] + ids("  yes"), 1)
    assert enc.rolling("doc") == [BOS] + ids("doc")
    assert enc.prompt("Q:") == [BOS] + ids("Q:") and enc.prompt("") == [BOS]


def test_runs_without_bos_condition_on_eos_or_fail_naming_the_task():
    enc = Encoder(ByteTokenizer(), add_bos=False)
    assert enc.pair("ab", "c") == (ids("abc"), 2)
    assert enc.pair("", "c") == ([EOS] + ids("c"), 1)
    assert enc.rolling("c") == [EOS] + ids("c")
    bare = Encoder(NoSpecials(), add_bos=True)
    assert bare.pair("ab", "c") == (ids("abc"), 2)
    with pytest.raises(RequestError, match="'wikitext'.*neither"):
        bare.rolling("c", task="wikitext")


def test_generation_options():
    assert parse_options({"until": ["\n", ""], "max_gen_toks": 5}, "t", 256) == Options(("\n",), 5)
    assert parse_options({"until": "\n"}, "t", 256) == Options(("\n",), 256)
    # Greedy unless do_sample with a temperature above 0, as in lm-eval's HF backend.
    assert parse_options({"do_sample": False, "temperature": 0.7}, "t", 8) == Options((), 8)
    assert parse_options({"do_sample": True, "temperature": 0.0}, "t", 8) == Options((), 8)
    assert parse_options({"do_sample": True, "top_p": 0.9}, "t", 8) == Options((), 8, 1.0, None, 0.9)
    assert parse_options({"num_beams": 1, "repetition_penalty": 1.0}, "t", 8) == Options((), 8)
    with pytest.raises(RequestError, match="'squad'.*'repetition_penalty': 1.2"):
        parse_options({"repetition_penalty": 1.2}, "squad", 8)
    with pytest.raises(RequestError, match="'squad'.*until"):
        parse_options({"until": [1]}, "squad", 8)


def test_cut_at_the_first_stop_string_found():
    assert cut("ab\ncd. ef", ["\n", "."]) == "ab"
    assert cut("ab. c\nd", ["\n", "."]) == "ab"
    assert cut("abc", []) == "abc" and cut("abc", ["x"]) == "abc"


def test_multimodal_requests_are_refused_naming_the_task():
    req = Instance("generate_until", {}, ("ctx", {"until": []}, {"visual": [None]}), 0,
                   ("mmmu_val", 0, 1))
    with pytest.raises(RequestError, match="'mmmu_val'.*visual"):
        GdnJaxLM._text_args(req, 2)


def test_buckets():
    assert [bucket(n) for n in (1, 32, 33, 48, 49, 64, 65, 96, 97, 1000)] == [
        32, 32, 48, 48, 64, 64, 96, 96, 128, 1024]
    assert bucket(10, floor=16) == 16 and bucket(17, floor=16) == 24
