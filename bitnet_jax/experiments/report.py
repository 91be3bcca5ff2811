"""The study's Markdown report: the paper's tables (mean ± sd over seeds), its
findings judged against the seed-to-seed noise (seeds.py), loss curves and
activation histograms (PNG)."""
from __future__ import annotations

import math
import os

from bitnet_jax.experiments import readme_sync
from bitnet_jax.experiments import study
from bitnet_jax.experiments.seeds import RULE, Stat, aggregate, pointwise, verdict

TABLE1 = (("fp", "LLaMA (fp)", "16 / 16", "SwiGLU"),
          ("b1.58_a8", "BitNet b1.58", "1.58 / 8", "SwiGLU"),
          ("a4.8_a8", "BitNet a4.8 a8 stage (= b1.58 with ReLU²)", "1.58 / 8",
           "ReLU²"),
          ("a4.8_a4", "BitNet a4.8", "1.58 / 4 (8, top-K)", "ReLU²"),
          ("v2_a8", "BitNet v2 (a8)", "1.58 / 8", "SwiGLU"),
          ("v2_a4", "BitNet v2 (a4)", "1.58 / 4", "SwiGLU"),
          ("v2_relu2_a8", "BitNet v2 (a8)", "1.58 / 8", "ReLU²"),
          ("v2_relu2_a4", "BitNet v2 (a4)", "1.58 / 4", "ReLU²"))
# (run at a8, run at a4, label); no rotation at a8 is b1.58 by construction
TABLE5 = (("b1.58_a8", "v2_none_a4", "No rotation"),
          ("v2_wa_a8", "v2_wa_a4", "Weight & activation rotation"),
          ("v2_a8", "v2_a4", "Activation rotation"))
PTQ_LABELS = {"quarot_unfused": ("QuaRot", "no", "W16A4"),
              "spinquant_unfused": ("SpinQuant", "no", "W16A4"),
              "quarot_fused": ("QuaRot", "yes", "W1.58A4"),
              "spinquant_fused": ("SpinQuant", "yes", "W1.58A4")}


def _finite(x) -> bool:
  if isinstance(x, Stat):
    return x.finite
  return x is not None and math.isfinite(x)


def ppl(x) -> str:
  return format(x, ".2f") if _finite(x) else "diverged"


def num(x, fmt=".3f") -> str:
  return format(x, fmt) if _finite(x) else "nan"


def summary(r: dict) -> dict:
  """{runs, attention, ptq} with a Stat (one value per seed) per number."""
  return aggregate([r["replicas"][str(k)] for k in r["seeds"]])


def table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def kurt(score: dict, site: str) -> str:
  k = score.get("kurtosis", {})
  text = num(k.get(f"{site}/input", math.nan), ".1f")
  if f"{site}/pre_rotation" in k:
    text += f" ({num(k[f'{site}/pre_rotation'], '.1f')} before H)"
  return text


def tables(r: dict) -> dict[str, str]:
  agg = summary(r)
  runs, att, ptq = agg["runs"], agg["attention"], agg["ptq"]
  out = {}
  out["Table 1: main results"] = table(
      ["Model", "W / A bits", "GLU", "Valid PPL ↓", "Train loss (end)",
       "Kurtosis, W_o input", "Kurtosis, W_down input"],
      [[label, bits, glu, ppl(runs[n]["ppl"]), num(runs[n]["train_loss"]),
        kurt(runs[n], "o"), kurt(runs[n], "down")]
       for n, label, bits, glu in TABLE1])
  rows = []
  for name, model in (("v2_a8", "BitNet v2 (a8)"), ("v2_a4", "BitNet v2 (a4)")):
    base = runs[name]["ppl"]
    for label, _ in study.ATTENTION_SETTINGS:
      p = att[name][label]["ppl"]
      rows.append([model, label, ppl(p), num(p - base, "+.3f")])
  out["Tables 2-3: low-bit attention states (post-RoPE, BOS K/V at 8 bits)"] = \
      table(["Model", "Q / K / V", "Valid PPL ↓", "Δ PPL"], rows)
  rows = []
  for name, _, _ in study.PTQ_RUNS:
    method, fused, bits = PTQ_LABELS[name]
    calib = ""
    if "calib_loss_start" in ptq[name]:
      calib = (f"{num(ptq[name]['calib_loss_start'])} → "
               f"{num(ptq[name]['calib_loss_end'])}")
    rows.append([f"{method} (b1.58 a8)", fused, bits, ppl(ptq[name]["ppl"]),
                 calib])
  rows.append(["BitNet v2 (a4)", "(native)", "W1.58A4", ppl(runs["v2_a4"]["ppl"]),
               ""])
  out["Table 4: post-training rotation baselines at 4-bit activations"] = table(
      ["Method", "Rotation fused into W_qkv, W_up,gate", "Those projections",
       "Valid PPL ↓", "SpinQuant calibration loss"], rows)
  rows = []
  for bits in (8, 4):
    for a8, a4, label in TABLE5:
      s = runs[a8 if bits == 8 else a4]
      rows.append([label, f"W1.58A{bits}", ppl(s["ppl"]), num(s["train_loss"])])
  c = runs["v2_centred_a4"]
  rows.append(["Activation rotation, mean-centred (this project)", "W1.58A4",
               ppl(c["ppl"]), num(c["train_loss"])])
  out["Table 5: Hadamard ablation of H-BitLinear"] = table(
      ["Rotation", "Bits", "Valid PPL ↓", "Train loss (end)"], rows)
  out["The rotated domain: what the W_o / W_down quantizers see"] = \
      rotated_table(agg["rotated"])
  return out


ROTATED_ROWS = (("b1.58_a8", "BitNet b1.58 (a8)"), ("v2_a8", "BitNet v2 (a8)"),
                ("v2_a4", "BitNet v2 (a4)"),
                ("v2_centred_a4", "BitNet v2 (a4), mean-centred"),
                ("v2_wa_a8", "v2, weight & activation rotation (a8)"),
                ("v2_relu2_a8", "BitNet v2 ReLU² (a8)"))


def rotated_table(rotated: dict) -> str:
  """Kurtosis, the largest per-channel share of a token's energy and the
  count of token-shared offset channels, before H -> what is quantized."""
  def cell(sites, site, stat, fmt):
    now = num(sites[f"{site}/input"][stat], fmt)
    before = sites.get(f"{site}/pre_rotation")
    return f"{num(before[stat], fmt)} → {now}" if before else now
  rows = []
  for name, label in ROTATED_ROWS:
    sites = rotated[name]["sites"]
    for site, title in (("o", "W_o"), ("down", "W_down")):
      rows.append([label, title, cell(sites, site, "kurtosis", ".1f"),
                   cell(sites, site, "max_channel_energy", ".3f"),
                   cell(sites, site, "offset_channels", ".1f")])
  return table(["Model", "Input of", "Kurtosis", "Largest channel energy "
                "share", "Offset channels (all layers)"], rows)


def claims(r: dict) -> list[str]:
  """The paper's qualitative findings, each judged on the paired per-seed
  quantity d against a threshold (seeds.verdict)."""
  agg = summary(r)
  runs, att, ptq = agg["runs"], agg["attention"], agg["ptq"]
  p = {n: runs[n]["ppl"] for n in runs}
  out = []

  def check(claim, measured, d: Stat, threshold: float, below: bool = True):
    side = "<" if below else ">"
    out.append(f"- {claim}: {measured}; d = {num(d, '+.3f')} (claim: d "
               f"{side} {threshold:+g}) — **{verdict(d, threshold, below)}**")

  def rel(a, b):  # paired relative difference a / b - 1
    return a / b - 1.0

  check("BitNet v2 (a8) matches BitNet b1.58 (a8) (Table 1)",
        f"PPL {ppl(p['v2_a8'])} vs {ppl(p['b1.58_a8'])}",
        rel(p["v2_a8"], p["b1.58_a8"]), 0.02)
  check("4-bit activations cost BitNet v2 little (Table 1)",
        f"PPL {ppl(p['v2_a4'])} (a4) vs {ppl(p['v2_a8'])} (a8)",
        rel(p["v2_a4"], p["v2_a8"]), 0.05)
  check("BitNet v2 (a4) is comparable to BitNet a4.8 (Table 1)",
        f"PPL {ppl(p['v2_a4'])} vs {ppl(p['a4.8_a4'])}",
        rel(p["v2_a4"], p["a4.8_a4"]), 0.03)
  check("... and to BitNet a4.8 with the same GLU (v2 with ReLU², matched)",
        f"PPL {ppl(p['v2_relu2_a4'])} vs {ppl(p['a4.8_a4'])}",
        rel(p["v2_relu2_a4"], p["a4.8_a4"]), 0.03)
  k = runs["v2_a8"]["kurtosis"]
  check("The Hadamard makes the W_o / W_down inputs Gaussian-like (Fig. 1)",
        f"kurtosis W_down {num(k['down/pre_rotation'], '.1f')} → "
        f"{num(k['down/input'], '.1f')}, W_o {num(k['o/pre_rotation'], '.1f')} → "
        f"{num(k['o/input'], '.1f')}",
        pointwise(max, k["down/input"] - k["down/pre_rotation"],
                  k["o/input"] - k["o/pre_rotation"]), 0.0)
  check("The Hadamard lowers the cost of the a8 → a4 switch (Table 5)",
        f"PPL a8 → a4: {ppl(p['v2_a8'])} → {ppl(p['v2_a4'])} with, "
        f"{ppl(p['b1.58_a8'])} → {ppl(p['v2_none_a4'])} without",
        rel(p["v2_a4"], p["v2_a8"]) - rel(p["v2_none_a4"], p["b1.58_a8"]), 0.0)
  check("Without rotation a4 training fails (Table 5: diverged)",
        f"PPL {ppl(p['v2_none_a4'])} (no rotation) vs {ppl(p['v2_a4'])}",
        rel(p["v2_none_a4"], p["v2_a4"]), 0.05, below=False)
  check("Mean-centring the H-BitLinear input (this project's option, not "
        "the paper's) lowers the a4 perplexity",
        f"PPL a4 {ppl(p['v2_centred_a4'])} centred vs {ppl(p['v2_a4'])}",
        rel(p["v2_centred_a4"], p["v2_a4"]), 0.0)
  check("Rotating weights too gives no gain over activations only (Table 5)",
        f"PPL a4 {ppl(p['v2_wa_a4'])} vs {ppl(p['v2_a4'])}",
        rel(p["v2_wa_a4"], p["v2_a4"]), -0.02, below=False)
  a4 = att["v2_a4"]
  check("3-bit KV with 4-bit Q stays close to full-precision states (Table 3)",
        f"PPL {ppl(a4['Q 4-bit, KV 3-bit']['ppl'])} vs {ppl(p['v2_a4'])}",
        rel(a4["Q 4-bit, KV 3-bit"]["ppl"], p["v2_a4"]), 0.05)
  best = pointwise(min, *(ptq[n]["ppl"] for n in ptq))
  check("BitNet v2 (a4) beats QuaRot and SpinQuant on b1.58 (Table 4)",
        f"PPL {ppl(p['v2_a4'])} vs best baseline {ppl(best)}",
        rel(p["v2_a4"], best), 0.0)
  unf = [ptq[n]["ppl"] for n in ("quarot_unfused", "spinquant_unfused")]
  fus = [ptq[n]["ppl"] for n in ("quarot_fused", "spinquant_fused")]
  check("Keeping the rotation out of W_qkv, W_up,gate helps the baselines "
        "(Table 4)", f"PPL {ppl(unf[0])} / {ppl(unf[1])} unfused vs "
        f"{ppl(fus[0])} / {ppl(fus[1])} fused (QuaRot / SpinQuant)",
        pointwise(max, rel(unf[0], fus[0]), rel(unf[1], fus[1])), 0.0)
  check("Learned rotations beat random Hadamard ones (Table 4, fused)",
        f"PPL {ppl(ptq['spinquant_fused']['ppl'])} vs "
        f"{ppl(ptq['quarot_fused']['ppl'])}",
        rel(ptq["spinquant_fused"]["ppl"], ptq["quarot_fused"]["ppl"]), 0.0)
  return out


def write_figures(out: str, fig_dir: str, activation_runs) -> list[str]:
  """Loss curves of the replica `out` (one seed) and activation histograms."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  os.makedirs(fig_dir, exist_ok=True)
  written = []
  groups = {"loss_table1.png": ("fp", "b1.58_a8", "a4.8_a8", "a4.8_a4", "v2_a8",
                                "v2_a4"),
            "loss_table5.png": ("b1.58_a8", "v2_none_a4", "v2_wa_a8",
                                "v2_wa_a4", "v2_a8", "v2_a4", "v2_relu2_a8",
                                "v2_relu2_a4", "v2_centred_a4")}
  for fname, names in groups.items():
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for n in names:
      steps, losses = study.loss_curve(os.path.join(out, "runs", n))
      ax.plot(steps, losses, label=n, linestyle="--" if n.endswith("a4") else "-",
              linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_ylim(top=min(ax.get_ylim()[1], 8.0))
    ax.legend(fontsize=7)
    ax.set_title("Training loss (a4 runs continue their a8 parent)", fontsize=9)
    path = os.path.join(fig_dir, fname)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
  if activation_runs:
    from bitnet_jax.evaluation.activation_report import write_figures as histograms
    written += histograms(fig_dir, activation_runs)
  return written


def markdown(r: dict, figures: list[str], report_dir: str) -> str:
  s = r["settings"]
  d = r["data"]
  lines = [
      "# BitNet v2 in miniature: the paper's tables at small scale", "",
      f"Command: `{r['command']}`  ",
      f"Machine: {r['machine']}  ",
      f"Data: `{os.path.basename(d['source'])}`, {d['documents']} documents; "
      f"the last {d['valid_documents']} ({d['valid_tokens']:,} tokens) held "
      f"out for validation, {d['train_documents']} ({d['train_tokens']:,} "
      "tokens) for training; one sentencepiece tokenizer "
      f"({s['vocab_size']} pieces) for every model.  ",
      f"Models: d_model {s['d_model']}, d_ff {s['d_ff']}, {s['num_layers']} "
      f"layers, {s['num_heads']} heads, context {s['seq_len']}; "
      f"{s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens "
      f"({s['steps'] * s['batch_size'] * s['seq_len']:,} tokens) each, "
      "two-stage schedule; a4 runs continue their a8 parent's checkpoint "
      f"(optimizer state included) at step {r['a4_start']}.  ",
      f"Validation PPL: every held-out token scored once in windows of "
      f"{s['seq_len']}. Kurtosis: mean over layers, {s['analysis_seqs']} "
      "held-out sequences (3 = Gaussian). Largest channel energy share: the "
      "largest per-channel share of a token's energy, averaged over tokens (mean over "
      "layers; 1/width when spread evenly); offset channels: channels whose "
      "|mean| over tokens exceeds twice their spread and holds more than "
      "4/width of the energy (a learned bias in effect).  ",
      f"Seeds: {', '.join(str(k) for k in r['seeds'])} (init and data "
      "order); tables show mean ± sd over seeds. Table 5's \"no rotation, "
      "a8\" model is BitNet b1.58 by construction (v2 without its Hadamard "
      "computes what b1.58 does), so its a4 run continues the b1.58 (a8) "
      "checkpoint.  ",
      f"Verdicts: each finding is a paired per-seed quantity d (relative "
      f"differences of perplexity unless stated) against a threshold; {RULE}.  ",
      f"Compute time of the whole study: {sum(r['minutes'].values()):.1f} min "
      f"(training {r['minutes']['train']:.1f}, scoring and PTQ "
      f"{r['minutes']['score']:.1f}, data and tokenizer "
      f"{r['minutes']['data']:.1f}), summed over the runs' logged wall "
      "times (figures and compilation of the report not included).", ""]
  for title, body in tables(r).items():
    lines += [f"## {title}", "", body, ""]
  lines += ["## The paper's findings at this scale", ""] + claims(r) + [""]
  lines += ["## Figures", ""]
  for path in figures:
    rel = os.path.relpath(path, report_dir)
    lines.append(f"![{os.path.basename(path)}]({rel})")
  lines.append("")
  return "\n".join(lines)


BEGIN, END = "<!-- paper_small:begin -->", "<!-- paper_small:end -->"


def sync_readme(report_path: str, readme_path: str) -> None:
  """Copy the report's tables and findings between the README's markers, so
  that no number in the README is typed by hand."""
  with open(report_path) as f:
    text = f.read()
  keep = []
  for block in text.split("\n## ")[1:]:
    title, _, body = block.partition("\n")
    if title == "Figures":
      continue
    keep.append(f"#### {title}\n{body.rstrip()}\n")
  readme_sync.replace_section(readme_path, BEGIN, END, "\n".join(keep))
