"""The GGUF export run by llama.cpp itself (optional: llama-cpp-python from
requirements-gguf-check.txt, which builds llama.cpp at install; skipped
without it, as in CI). The file loads, generates, and scores held-out
documents within 2% of bitnet_jax's perplexity in the same windows."""
import pytest

pytest.importorskip("llama_cpp")

from bitnet_jax.evaluation import perplexity  # noqa: E402
from bitnet_jax.experiments import gguf_check  # noqa: E402
from bitnet_jax.gguf_file import writer  # noqa: E402
from bitnet_jax.inference import pretrained  # noqa: E402


def test_llama_cpp_runs_the_export_as_we_do(gguf_run, tmp_path):
  import llama_cpp
  pre = pretrained.load(gguf_run)
  path = writer.write(pre, str(tmp_path / "gguf"))["file"]
  docs, _ = perplexity.corpus_documents(pre, perplexity.Documents())
  r = gguf_check.compare(pre, path, docs[:20])
  print(r)
  assert abs(r["ppl_ratio"] - 1) < 0.02
  llm = llama_cpp.Llama(model_path=path, n_ctx=64, verbose=False)
  assert llm.tokenize(docs[0].encode(), add_bos=False) == pre.tokenizer.encode(
      docs[0])
  out = llm.create_completion(docs[0][:40], max_tokens=8, temperature=0)
  assert out["usage"]["completion_tokens"] > 0


def test_llama_cpp_tokenizes_a_tokenizer_json_run_as_we_do(gguf_run, tmp_path):
  import llama_cpp
  from test_gguf import byte_level_run
  pre = pretrained.load(byte_level_run(gguf_run, tmp_path))
  path = writer.write(pre, str(tmp_path / "gguf"))["file"]
  docs, _ = perplexity.corpus_documents(pre, perplexity.Documents())
  llm = llama_cpp.Llama(model_path=path, n_ctx=64, verbose=False)
  for doc in docs[:10]:
    assert llm.tokenize(doc.encode(), add_bos=False) == pre.tokenizer.encode(doc)
  r = gguf_check.compare(pre, path, docs[:5])
  assert abs(r["ppl_ratio"] - 1) < 0.02
