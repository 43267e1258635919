"""bench/lm_eval_check.py's pieces that need no model: the tasks it builds from held-out files, and
the tokenizer.json it gives byte-tokenizer runs for lm-eval's hf backend."""

import json
import os
import sys

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[lm_eval]'")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import lm_eval_check  # noqa: E402

from gdn_jax.data.corpus import embedded_documents  # noqa: E402
from gdn_jax.data.tokenizers import ByteTokenizer, HFTokenizer  # noqa: E402


def test_line_tasks_hold_the_true_next_line(tmp_path):
    counts = lm_eval_check.build_tasks(str(tmp_path), num_lines=40, num_files=3)
    assert counts == {"stdlib_next_line": 40, "stdlib_complete": 40, "stdlib_ppl": 3}
    docs = embedded_documents("heldout")
    with open(tmp_path / "stdlib_next_line.jsonl") as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        assert r["choices"][r["label"]] == r["target"] and len(set(r["choices"])) == 4
        assert r["context"].endswith("\n") and 0 < len(r["context"]) <= 1000
        assert any(r["context"] + r["target"] + "\n" in d for d in docs)
    with open(tmp_path / "stdlib_complete.yaml") as f:
        assert json.load(f)["generation_kwargs"] == {"until": ["\n"], "max_gen_toks": 96}


def test_byte_tokenizer_json_encodes_as_the_byte_tokenizer(tmp_path):
    lm_eval_check.byte_tokenizer_files(str(tmp_path))
    hf = HFTokenizer(str(tmp_path / "tokenizer.json"))
    text = "".join(chr(i) for i in range(1, 0x800)) + " def f(x):\n\treturn x  # é €"
    assert hf.encode(text) == ByteTokenizer().encode(text)
    assert hf.decode(hf.encode(text)) == text
    assert (hf.vocab_size, hf.bos_id, hf.eos_id) == (258, 256, 257)


def test_fla_mode_is_written_into_the_exported_config(tmp_path):
    config = {"model_type": "gated_deltanet", "attn_mode": "chunk", "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    lm_eval_check.set_fla_mode(str(tmp_path), "fused_recurrent")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == dict(config, attn_mode="fused_recurrent")
