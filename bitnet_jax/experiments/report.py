"""The study's Markdown report: the paper's tables, its claims checked against
the measured numbers, loss curves and activation histograms (PNG)."""
from __future__ import annotations

import math
import os

from bitnet_jax.experiments import readme_sync
from bitnet_jax.experiments import study

TABLE1 = (("fp", "LLaMA (fp)", "16 / 16"),
          ("b1.58_a8", "BitNet b1.58", "1.58 / 8"),
          ("a4.8_a4", "BitNet a4.8", "1.58 / 4 (8, top-K)"),
          ("v2_a8", "BitNet v2 (a8)", "1.58 / 8"),
          ("v2_a4", "BitNet v2 (a4)", "1.58 / 4"))
TABLE5 = (("v2_none", "No rotation"),
          ("v2_wa", "Weight & activation rotation"),
          ("v2", "Activation rotation"))
PTQ_LABELS = {"quarot_unfused": ("QuaRot", "no", "W16A4"),
              "spinquant_unfused": ("SpinQuant", "no", "W16A4"),
              "quarot_fused": ("QuaRot", "yes", "W1.58A4"),
              "spinquant_fused": ("SpinQuant", "yes", "W1.58A4")}


def ppl(x) -> str:
  return f"{x:.2f}" if x is not None and math.isfinite(x) else "diverged"


def num(x, fmt=".3f") -> str:
  return format(x, fmt) if x is not None and math.isfinite(x) else "nan"


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
  runs, att, ptq = r["runs"], r["attention"], r["ptq"]
  out = {}
  out["Table 1: main results"] = table(
      ["Model", "W / A bits", "Valid PPL ↓", "Train loss (end)",
       "Kurtosis, W_o input", "Kurtosis, W_down input"],
      [[label, bits, ppl(runs[n]["ppl"]), num(runs[n]["train_loss"]),
        kurt(runs[n], "o"), kurt(runs[n], "down")] for n, label, bits in TABLE1])
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
    for prefix, label in TABLE5:
      s = runs[f"{prefix}_a{bits}"]
      rows.append([label, f"W1.58A{bits}", ppl(s["ppl"]), num(s["train_loss"])])
  out["Table 5: Hadamard ablation of H-BitLinear"] = table(
      ["Rotation", "Bits", "Valid PPL ↓", "Train loss (end)"], rows)
  return out


def claims(r: dict) -> list[str]:
  """The paper's qualitative findings, each checked on the measured numbers."""
  runs, att, ptq = r["runs"], r["attention"], r["ptq"]
  p = {n: runs[n]["ppl"] for n in runs}
  fin = lambda x: x is not None and math.isfinite(x)
  out = []

  def check(claim, measured, holds):
    out.append(f"- {claim}: {measured} — **{'agrees' if holds else 'differs'}**")

  check("BitNet v2 (a8) matches BitNet b1.58 (a8) (Table 1)",
        f"PPL {ppl(p['v2_a8'])} vs {ppl(p['b1.58_a8'])}",
        fin(p["v2_a8"]) and p["v2_a8"] <= 1.02 * p["b1.58_a8"])
  check("4-bit activations cost BitNet v2 little (Table 1)",
        f"PPL {ppl(p['v2_a4'])} (a4) vs {ppl(p['v2_a8'])} (a8)",
        fin(p["v2_a4"]) and p["v2_a4"] <= 1.05 * p["v2_a8"])
  check("BitNet v2 (a4) is comparable to BitNet a4.8 (Table 1)",
        f"PPL {ppl(p['v2_a4'])} vs {ppl(p['a4.8_a4'])}",
        fin(p["v2_a4"]) and p["v2_a4"] <= 1.03 * p["a4.8_a4"])
  k = runs["v2_a8"]["kurtosis"]
  check("The Hadamard makes the W_o / W_down inputs Gaussian-like (Fig. 1)",
        f"kurtosis W_down {num(k['down/pre_rotation'], '.1f')} → "
        f"{num(k['down/input'], '.1f')}, W_o {num(k['o/pre_rotation'], '.1f')} → "
        f"{num(k['o/input'], '.1f')}",
        k["down/input"] < k["down/pre_rotation"] and k["o/input"] < k["o/pre_rotation"])
  check("Without rotation a4 training fails (Table 5: diverged)",
        f"PPL {ppl(p['v2_none_a4'])} (no rotation) vs {ppl(p['v2_a4'])}",
        not fin(p["v2_none_a4"]) or p["v2_none_a4"] > 1.05 * p["v2_a4"])
  check("Rotating weights too gives no gain over activations only (Table 5)",
        f"PPL a4 {ppl(p['v2_wa_a4'])} vs {ppl(p['v2_a4'])}",
        fin(p["v2_wa_a4"]) and p["v2_wa_a4"] >= 0.98 * p["v2_a4"])
  a4 = att["v2_a4"]
  check("3-bit KV with 4-bit Q stays close to full-precision states (Table 3)",
        f"PPL {ppl(a4['Q 4-bit, KV 3-bit']['ppl'])} vs {ppl(p['v2_a4'])}",
        fin(a4["Q 4-bit, KV 3-bit"]["ppl"]) and
        a4["Q 4-bit, KV 3-bit"]["ppl"] <= 1.05 * p["v2_a4"])
  best_ptq = min(ptq[n]["ppl"] for n in ptq if fin(ptq[n]["ppl"])) \
      if any(fin(ptq[n]["ppl"]) for n in ptq) else math.inf
  check("BitNet v2 (a4) beats QuaRot and SpinQuant on b1.58 (Table 4)",
        f"PPL {ppl(p['v2_a4'])} vs best baseline {ppl(best_ptq)}",
        fin(p["v2_a4"]) and p["v2_a4"] < best_ptq)
  unf = [ptq[n]["ppl"] for n in ("quarot_unfused", "spinquant_unfused")]
  fus = [ptq[n]["ppl"] for n in ("quarot_fused", "spinquant_fused")]
  check("Keeping the rotation out of W_qkv, W_up,gate helps the baselines "
        "(Table 4)", f"PPL {ppl(unf[0])} / {ppl(unf[1])} unfused vs "
        f"{ppl(fus[0])} / {ppl(fus[1])} fused (QuaRot / SpinQuant)",
        all(fin(u) for u in unf) and unf[0] < fus[0] and unf[1] < fus[1])
  sq = ptq["spinquant_fused"]
  check("Learned rotations beat random Hadamard ones (Table 4, fused)",
        f"PPL {ppl(sq['ppl'])} vs {ppl(ptq['quarot_fused']['ppl'])}",
        fin(sq["ppl"]) and sq["ppl"] <= ptq["quarot_fused"]["ppl"])
  return out


def write_figures(r: dict, out: str, fig_dir: str, activation_runs) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  os.makedirs(fig_dir, exist_ok=True)
  written = []
  groups = {"loss_table1.png": ("fp", "b1.58_a8", "a4.8_a8", "a4.8_a4", "v2_a8",
                                "v2_a4"),
            "loss_table5.png": ("v2_none_a8", "v2_none_a4", "v2_wa_a8",
                                "v2_wa_a4", "v2_a8", "v2_a4")}
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
      "held-out sequences (3 = Gaussian).  ",
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
