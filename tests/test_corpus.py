"""Document sources, the held-out split, and clear errors for bad input."""
import json
import logging

import pytest

from bitnet_jax import defaults
from bitnet_jax.data import corpus
from bitnet_jax.run_config import RunConfig


def data_cfg(**kw):
  d = defaults.base_config().data
  d.update(kw)
  return d


def test_text_blank_line_and_file_splits(tmp_path):
  (tmp_path / "a.txt").write_text("one\nstill one\n\n\ntwo\n  \nthree")
  (tmp_path / "b.txt").write_text("four")
  docs, _ = corpus.load_local_documents(data_cfg(source="text",
                                                 paths=str(tmp_path / "*.txt")))
  assert docs == ["one\nstill one", "two", "three", "four"]
  docs, _ = corpus.load_local_documents(data_cfg(
      source="text", paths=f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}",
      doc_split="file"))
  assert docs == ["one\nstill one\n\n\ntwo\n  \nthree", "four"]


def test_jsonl_source(tmp_path):
  lines = [{"text": "alpha"}, {"text": "beta", "id": 2}, {"text": ""}]
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n\n")
  docs, _ = corpus.load_local_documents(data_cfg(source="jsonl",
                                                 paths=str(tmp_path / "d.jsonl")))
  assert docs == ["alpha", "beta"]


def test_stdlib_default_is_found():
  docs, desc = corpus.load_local_documents(data_cfg(source="stdlib", max_docs=50))
  assert len(docs) == 50 and "stdlib" in desc
  assert any("import" in d for d in docs)


def test_split_is_deterministic_disjoint_and_content_based(documents):
  docs = documents + documents[:10]  # duplicates
  train, held = corpus.split_train_eval(docs, 0.2)
  again = corpus.split_train_eval(list(reversed(docs)), 0.2)
  assert sorted(train) == sorted(again[0]) and sorted(held) == sorted(again[1])
  assert not set(train) & set(held)
  assert len(train) + len(held) == len(docs)
  assert 0.1 < len(held) / len(docs) < 0.3


def test_tiny_corpus_still_gets_a_held_out_document(tmp_path):
  (tmp_path / "t.txt").write_text("a\n\nb\n\nc\n\na")
  split = corpus.load_corpus(data_cfg(source="text", paths=str(tmp_path / "t.txt"),
                                      eval_fraction=0.01))
  assert len(split.eval) >= 1
  assert not set(split.train) & set(split.eval)


@pytest.mark.parametrize("paths,error,match", [
    ("{d}/missing.txt", FileNotFoundError, "missing.txt"),
    ("{d}/*.nothing", FileNotFoundError, "matched no files"),
    ("{d}", ValueError, "is a directory"),
    ("", ValueError, "data.paths is empty"),
])
def test_bad_paths(tmp_path, paths, error, match):
  with pytest.raises(error, match=match):
    corpus.load_corpus(data_cfg(source="text", paths=paths.format(d=tmp_path)))


def test_empty_corpus_and_bad_fields(tmp_path):
  (tmp_path / "empty.txt").write_text("\n\n   \n")
  with pytest.raises(ValueError, match="no documents"):
    corpus.load_corpus(data_cfg(source="text", paths=str(tmp_path / "empty.txt")))
  (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(KeyError, match=r"x.jsonl:2: no field 'text'"):
    corpus.load_corpus(data_cfg(source="jsonl", paths=str(tmp_path / "x.jsonl")))
  (tmp_path / "y.jsonl").write_text('{"text": "ok"}\nnot json\n')
  with pytest.raises(ValueError, match=r"y.jsonl:2: not JSON"):
    corpus.load_corpus(data_cfg(source="jsonl", paths=str(tmp_path / "y.jsonl")))
  # (an unknown data.source is the run config's to refuse: test_run_config)
  with pytest.raises(ValueError, match="'parquet' is not a local source"):
    corpus.load_corpus(data_cfg(source="parquet"))


def test_non_utf8_is_replaced_with_a_warning(tmp_path, caplog):
  (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
  with caplog.at_level(logging.WARNING):
    docs, _ = corpus.load_local_documents(data_cfg(
        source="text", paths=str(tmp_path / "latin.txt")))
  assert docs == ["caf\ufffd au lait"]
  assert "latin.txt is not valid UTF-8" in caplog.text


def test_unknown_tfds_name_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="'no_such_corpus_xyz'.*cannot be read"):
    corpus.load_corpus(data_cfg(source="tfds", tfds_name="no_such_corpus_xyz",
                                tfds_data_dir=str(tmp_path)))
  config = defaults.base_config()
  config.data.source = "tfds"
  with pytest.raises(ValueError, match="data.tfds_name must name a dataset"):
    RunConfig.from_config(config)
