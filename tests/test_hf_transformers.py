"""Cross-check against transformers' own BitNetForCausalLM (optional: torch,
transformers and accelerate from requirements-hf-check.txt; skipped without
them, as in CI, where torch alone would be a multi-GB install).

Two directions: a Hugging Face checkpoint (packed offline weights, and bf16
master weights quantized online) imported here, and a b1.58 run exported by
`export --format=hf` / `hf-bf16` and loaded by transformers; in both,
transformers' logits and ours on the same tokens (float32 both sides).

The two implementations differ in one convention: the paper's quantizers
(Eq. 1, 5; ours) divide by alpha + eps and gamma + eps, transformers' by
max(alpha, eps) and max(gamma, eps). That moves a code that sits within
~eps / gamma of a rounding boundary, so the logits differ by ~1e-3 relative.
With transformers' quantizers set to the paper's convention (`paper_eps`)
the two agree to float rounding, which checks names, layout, packing, scales,
norms, GQA, RoPE and the GLU exactly.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_hf_import import write_hf_dir  # noqa: E402

EPS = 1e-5


class _PaperActQuant(torch.autograd.Function):
  """Eq. 5: gamma / 127 * RoundClip(127 / (gamma + eps) x, -128, 127)."""

  @staticmethod
  def forward(ctx, x):
    gamma = x.abs().max(dim=-1, keepdim=True).values
    return (x * 127 / (gamma + EPS)).round().clamp(-128, 127) * gamma / 127

  @staticmethod
  def backward(ctx, g):
    return g


class _PaperWeightQuant(torch.autograd.Function):
  """Eq. 1: alpha * RoundClip(W / (alpha + eps), -1, 1)."""

  @staticmethod
  def forward(ctx, w):
    alpha = w.float().abs().mean()
    return ((w.float() / (alpha + EPS)).round().clamp(-1, 1) * alpha).to(w.dtype)

  @staticmethod
  def backward(ctx, g):
    return g


@pytest.fixture(params=["paper_eps", "transformers_eps"])
def convention(request, monkeypatch):
  if request.param == "paper_eps":
    from transformers.integrations import bitnet
    monkeypatch.setattr(bitnet, "ActQuant", _PaperActQuant)
    monkeypatch.setattr(bitnet, "WeightQuant", _PaperWeightQuant)
  return request.param


def transformers_logits(hf_dir, tokens, cast: bool = True) -> np.ndarray:
  """cast: make every tensor float32 after loading (transformers keeps a
  pre-quantized bf16 file's float tensors in bf16 under dtype=float32); a
  float32 file loads in float32 as it is."""
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(hf_dir), dtype=torch.float32)
  for t in list(model.parameters()) + list(model.buffers()):
    if cast and t.is_floating_point():
      t.data = t.data.float()
  model.eval()
  with torch.no_grad():
    out = model(torch.tensor(np.asarray(tokens)[None], dtype=torch.long))
  return out.logits[0].float().numpy()


def our_logits(pre, tokens) -> np.ndarray:
  return np.asarray(pre.model.apply({"params": pre.params},
                                    jnp.asarray(np.asarray(tokens)[None])))[0]


def relative_error(got, want):
  return np.abs(got - want) / np.abs(want).max()


@pytest.mark.parametrize("form", ["packed", "master"])
def test_imported_checkpoint_matches_transformers(tmp_path, documents, form,
                                                  convention):
  from bitnet_jax.hf import importer
  from bitnet_jax.inference import pretrained
  hf_dir = tmp_path / "hf"
  hf, _ = write_hf_dir(hf_dir, form, documents)
  if form == "master":  # the -bf16 layout: transformers quantizes online
    hf["quantization_config"] = dict(hf["quantization_config"],
                                     quantization_mode="online")
    (hf_dir / "config.json").write_text(json.dumps(hf))
  importer.import_checkpoint(str(hf_dir), str(tmp_path / "run"), seq_len=16)
  pre = pretrained.load(str(tmp_path / "run"))
  tokens = pre.tokenizer.encode(documents[0])[:16]
  err = relative_error(our_logits(pre, tokens), transformers_logits(hf_dir, tokens))
  print(f"{form} {convention}: median {np.median(err):.2e}, max {err.max():.2e}")
  if convention == "paper_eps":
    assert np.median(err) < 1e-5 and err.max() < 1e-2
  else:
    assert np.median(err) < 2e-3


@pytest.mark.parametrize("fmt", ["hf", "hf-float32", "hf-bf16"])
def test_exported_run_matches_transformers(tmp_path, b158_run, documents, fmt,
                                          convention):
  """Loaded as a user loads it: `from_pretrained(DIR, dtype=<the dtype it
  was exported in>)`, nothing cast after; hf-float32 is `--format=hf
  --dtype=float32`. The bf16 files are compared in float32 (cast: the
  arithmetic, not the file, would differ otherwise)."""
  from bitnet_jax.hf import exporter
  from bitnet_jax.inference import pretrained
  pre = pretrained.load(b158_run)
  dtype = "float32" if fmt == "hf-float32" else "bfloat16"
  fmt = fmt.replace("-float32", "")
  exporter.export_hf(pre, str(tmp_path / "hf"), fmt, dtype)
  if dtype == "bfloat16":  # and it loads as written, in bf16
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), dtype=torch.bfloat16)
    with torch.no_grad():
      assert model(torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16
  tokens = pre.tokenizer.encode(documents[1])[:pre.model_cfg.seq_len]
  if fmt == "hf-bf16":  # the file holds the latents in bf16: so do we here
    pre.params = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16).astype(x.dtype), pre.params)
  ours = our_logits(pre, tokens)
  err = relative_error(ours, transformers_logits(
      tmp_path / "hf", tokens, cast=dtype == "bfloat16"))
  print(f"{fmt} {convention}: median {np.median(err):.2e}, max {err.max():.2e}")
  if convention == "paper_eps" and (fmt == "hf-bf16" or dtype == "float32"):
    assert np.median(err) < 1e-5  # the same numbers: float rounding only
  else:  # hf: the file's scales, norms, embeddings are bf16 (ours float32)
    assert np.median(err) < 3e-3
