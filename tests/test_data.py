"""Data pipeline: packing, exact resumption, process sharding, tokenizers, sources, config parsing."""

import json

import grain
import numpy as np
import pytest

from configs import experiment
from configs.experiment import DataConfig
from gdn_jax.data import corpus, pipeline, sources, tokenizers


def _docs_dataset(docs):
    return grain.MapDataset.source([np.asarray(d, np.int32) for d in docs])


def _unpack_stream(batches, row):
    """Rebuilds the (document index, token) sequence a row consumed from its batches' inputs."""
    out = []
    for b in batches:
        for t in range(b["tokens"].shape[1]):
            out.append(int(b["tokens"][row, t]))
    return out


def test_packed_rows_segments_positions_and_targets():
    # Documents of distinct lengths with distinct token values: doc i holds 100*i + offset.
    lengths = [5, 3, 9, 2, 7, 4, 6, 1, 8, 3]
    docs = [[100 * i + j for j in range(n)] for i, n in enumerate(lengths)]
    it = iter(pipeline.PackedRows(_docs_dataset(docs), rows=range(2), num_streams=2, seq_len=8))
    b = next(it)
    # Row 0 reads docs 0, 2, 4, ... ; its first 9 slots are doc 0 (5 tokens) then doc 2 (4 tokens).
    np.testing.assert_array_equal(b["tokens"][0], [0, 1, 2, 3, 4, 200, 201, 202])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(b["targets"][0], [1, 2, 3, 4, 200, 201, 202, 203])
    np.testing.assert_array_equal(b["loss_mask"][0], [1, 1, 1, 1, 0, 1, 1, 1])
    # Row 1 reads docs 1, 3, 5, ...: 3 + 2 + 4 tokens, three segments.
    np.testing.assert_array_equal(b["tokens"][1], [100, 101, 102, 300, 301, 500, 501, 502])
    np.testing.assert_array_equal(b["segment_ids"][1], [1, 1, 1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(b["loss_mask"][1], [1, 1, 0, 1, 0, 1, 1, 1])
    # The next batch continues doc 2 at the token that was the last target.
    b2 = next(it)
    assert b2["tokens"][0, 0] == 203 and b2["positions"][0, 0] == 3
    assert b2["segment_ids"][0, 0] == 1


def test_packed_rows_exact_resume_no_skip_no_repeat():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(0, 50, size=rng.integers(1, 40))) for _ in range(23)]
    ds = pipeline.PackedRows(_docs_dataset(docs), rows=range(3), num_streams=3, seq_len=16)
    it = iter(ds)
    batches = [next(it) for _ in range(4)]
    state = json.loads(json.dumps(it.get_state()))
    rest_a = [next(it) for _ in range(5)]
    it2 = iter(ds)
    it2.set_state(state)
    rest_b = [next(it2) for _ in range(5)]
    for a, b in zip(rest_a, rest_b):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Every row is exactly its document stream, in order (docs r, r + 3, ... of the epoch order),
    # with inputs tiling the stream without gaps or repeats.
    for row in range(3):
        got = _unpack_stream(batches + rest_a, row)
        want = [t for k in range(200) for t in docs[(row + 3 * k) % len(docs)]][: len(got)]
        assert got == want


def test_process_shards_equal_global_batch():
    cfg = DataConfig(seq_len=32, prefetch=0)
    full = iter(pipeline.make_dataset(cfg, global_batch=4, rows=range(4)))
    lo = iter(pipeline.make_dataset(cfg, global_batch=4, rows=range(0, 2)))
    hi = iter(pipeline.make_dataset(cfg, global_batch=4, rows=range(2, 4)))
    for _ in range(3):
        f, a, b = next(full), next(lo), next(hi)
        for k in f:
            np.testing.assert_array_equal(f[k], np.concatenate([a[k], b[k]]))


def test_global_position_resumes_on_another_process_split():
    # Saved by 2 processes (rows 0-1 and 2-5), resumed by 3 (rows 0-1, 2-3, 4-5) and by 1.
    rng = np.random.default_rng(1)
    docs = _docs_dataset([list(rng.integers(0, 50, size=rng.integers(1, 30))) for _ in range(40)])
    make = lambda rows: iter(pipeline.PackedRows(docs, rows=rows, num_streams=6, seq_len=8))
    saved = [make(range(0, 2)), make(range(2, 6))]
    for it in saved:
        for _ in range(3):
            next(it)
    merged = pipeline.merge_states([it.get_state() for it in reversed(saved)])
    assert merged["rows"] == list(range(6)) and merged["global_batch"] == 6
    want = [{k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
            for bs in zip(*[[next(it) for _ in range(2)] for it in saved])]
    for split in ([range(0, 2), range(2, 4), range(4, 6)], [range(6)]):
        resumed = [make(rows) for rows in split]
        for it in resumed:
            it.set_state(merged)
        got = [{k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
               for bs in zip(*[[next(it) for _ in range(2)] for it in resumed])]
        for a, b in zip(want, got):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    # document_ids: row r reads documents r, r + 6, ... of the shuffled order.
    assert set(np.unique(want[0]["document_ids"][1])) <= set(range(1, 40, 6))
    with pytest.raises(ValueError, match="saved with train.global_batch=6, this run has 3"):
        iter(pipeline.PackedRows(docs, rows=range(3), num_streams=3, seq_len=8)).set_state(merged)
    with pytest.raises(ValueError, match="no position for rows"):
        make(range(6)).set_state(saved[1].get_state())


def test_prefetched_iterator_state_resumes():
    cfg = DataConfig(seq_len=32, prefetch=3)
    it = iter(pipeline.make_dataset(cfg, global_batch=2, rows=range(2)))
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    it2 = iter(pipeline.make_dataset(cfg, global_batch=2, rows=range(2)))
    it2.set_state(state)
    got = [next(it2) for _ in range(2)]
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    it.close()
    it2.close()


def test_embedded_corpus_splits_are_disjoint_and_nonempty():
    train, held = corpus.embedded_documents("train"), corpus.embedded_documents("heldout")
    assert len(train) > 100 and len(held) > 5
    assert not set(train.paths) & set(held.paths)
    assert "def " in held[0] or "class " in held[0] or "import" in held[0]


def _training_text(n_docs=40):
    docs = corpus.embedded_documents("train")
    return [docs[i][:4000] for i in range(n_docs)]


def test_sentencepiece_tokenizer_built_on_the_fly(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(
        "\n".join(line for doc in _training_text() for line in doc.splitlines() if line.strip())
    )
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=300,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
    )
    tok = tokenizers.get_tokenizer(str(tmp_path / "sp.model"))
    assert tok.vocab_size == 300 and tok.bos_id == 1 and tok.eos_id == 2
    text = "def main return the value"  # (SentencePiece folds newlines and runs of spaces)
    assert tok.decode(tok.encode(text)) == text
    cfg = DataConfig(tokenizer=str(tmp_path / "sp.model"), seq_len=64, prefetch=0)
    b = next(iter(pipeline.make_dataset(cfg, global_batch=2, rows=range(2))))
    assert b["tokens"].max() < 300 and b["tokens"][0, 0] == 1


def test_hf_tokenizer_json_built_on_the_fly(tmp_path):
    tk = pytest.importorskip("tokenizers")
    model = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(_training_text(), trainer=trainer)
    path = str(tmp_path / "tokenizer.json")
    model.save(path)
    tok = tokenizers.get_tokenizer(path)
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.vocab_size <= 400
    text = "import os\nprint(os.getcwd())"
    assert tok.decode(tok.encode(text)) == text
    cfg = DataConfig(tokenizer=path, seq_len=64, prefetch=0)
    b = next(iter(pipeline.make_dataset(cfg, global_batch=2, rows=range(2))))
    assert b["tokens"].max() < tok.vocab_size


def test_byte_tokenizer_roundtrip():
    tok = tokenizers.ByteTokenizer()
    assert tok.decode(tok.encode("héllo ✓")) == "héllo ✓"
    assert tok.vocab_size == 258


def test_jsonl_and_text_sources(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i} " * (i + 1)}) for i in range(5)) + "\n")
    docs = sources.DOCUMENT_SOURCES["jsonl"](DataConfig(source="jsonl", paths=(str(path),)))
    assert len(docs) == 5 and docs[3] == "doc 3 " * 4
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    docs = sources.DOCUMENT_SOURCES["text"](
        DataConfig(source="text", paths=(str(tmp_path / "*.txt"),))
    )
    assert list(docs) == ["alpha", "beta"]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        sources.DOCUMENT_SOURCES["text"](DataConfig(source="text", paths=("/nonexistent/*.txt",)))


def test_mqar_batch_source_is_process_invariant():
    cfg = DataConfig(
        source="mqar", seq_len=64, prefetch=0, options={"num_kv_pairs": 4, "vocab_size": 64}
    )
    full = iter(pipeline.make_dataset(cfg, global_batch=4, rows=range(4), seed=3))
    half = iter(pipeline.make_dataset(cfg, global_batch=4, rows=range(2, 4), seed=3))
    f, h = next(full), next(half)
    np.testing.assert_array_equal(f["tokens"][2:], h["tokens"])
    assert f["loss_mask"].sum() == 4 * 4


def test_config_overrides_and_roundtrip():
    cfg = experiment.get_config("tiny")
    cfg2 = experiment.apply_overrides(
        cfg, ["train.lr=1e-3", "model.d_model=128", "data.paths=a,b", 'data.options={"x": 1}']
    )
    assert cfg2.train.lr == 1e-3 and cfg2.model.d_model == 128 and cfg2.data.paths == ("a", "b")
    assert experiment.from_dict(json.loads(json.dumps(experiment.to_dict(cfg2)))) == cfg2
    with pytest.raises(ValueError, match="train has no field 'lrr'"):
        experiment.apply_overrides(cfg, ["train.lrr=1"])
    with pytest.raises(ValueError, match="config has no field 'optim'"):
        experiment.apply_overrides(cfg, ["optim.lr=1"])
    with pytest.raises(TypeError, match="train.steps"):
        experiment.apply_overrides(cfg, ["train.steps=many"])
    with pytest.raises(ValueError, match="unknown config"):
        experiment.get_config("no_such_preset")
