"""The runs of the paper in miniature and how each is trained and scored.

Every model has the same shape and sees the same tokens (same data, batch and
steps; the same tokenizer trained once). a4 runs continue their a8 parent's
checkpoint at step `a4_start` with its optimizer state, like the paper's
recipe, and train the last 5% of the schedule at 4-bit activations. Every run
is trained at each of `Settings.seeds` (init and data order), one replica
directory per seed (OUT/seed<k>/runs, results, ptq).

Table 5's "no rotation" model at 8 bits is BitNet b1.58 by construction (v2
with hadamard=none computes exactly what b1.58 does), so its a4 run continues
the b1.58 (a8) checkpoint instead of training a copy. Likewise BitNet a4.8's
8-bit stage is b1.58 with the squared-ReLU GLU, the matched baseline of the
v2 ReLU² runs. v2_centred_a4 continues v2 (a8) with the mean-centred
H-BitLinear of this project (layers.py), its offsets calibrated at the switch.

Everything is resumable: a run whose summary.json reports its last step is
not trained again (an interrupted one resumes from its checkpoints), and
every evaluation is cached as a JSON file under results/.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time

import ml_collections

from bitnet_jax import defaults, rundir
from bitnet_jax.errors import InputError, MissingInput
from bitnet_jax.data import tokenizer as tokenizer_lib
from bitnet_jax.data.corpus import split_documents
from bitnet_jax.training import trainer

A4_FRACTION = 0.05  # the paper: the last 5B of 100B tokens


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  variant: str
  act_bits: int = 8
  hadamard: str = "activation"
  parent: str | None = None   # the a8 run an a4 run continues from
  activation: str = ""        # GLU; "" = the variant's (relu2 for a4.8)
  mean_centre: bool = False   # centred H-BitLinear (offsets set at a4 start)


RUNS = (
    Run("fp", "fp"),
    Run("b1.58_a8", "b1.58"),
    Run("a4.8_a8", "a4.8"),
    Run("a4.8_a4", "a4.8", 4, parent="a4.8_a8"),
    Run("v2_a8", "v2"),
    Run("v2_a4", "v2", 4, parent="v2_a8"),
    Run("v2_none_a4", "v2", 4, hadamard="none", parent="b1.58_a8"),
    Run("v2_wa_a8", "v2", hadamard="weight_and_activation"),
    Run("v2_wa_a4", "v2", 4, hadamard="weight_and_activation",
        parent="v2_wa_a8"),
    # a4.8's squared-ReLU GLU on v2: a matched comparison (b1.58 with it is
    # a4.8's own a8 stage, which computes exactly that)
    Run("v2_relu2_a8", "v2", activation="relu2"),
    Run("v2_relu2_a4", "v2", 4, activation="relu2", parent="v2_relu2_a8"),
    # this project's option: quantize H x - mu, mu calibrated at the switch
    Run("v2_centred_a4", "v2", 4, parent="v2_a8", mean_centre=True),
)
RUN_BY_NAME = {r.name: r for r in RUNS}
# Tables 2-3: attention-state bits evaluated on the v2 runs.
ATTENTION_SETTINGS = (("QKV 16-bit", {}), ("KV 4-bit", {"kv_bits": 4}),
                      ("QKV 4-bit", {"q_bits": 4, "kv_bits": 4}),
                      ("Q 4-bit, KV 3-bit", {"q_bits": 4, "kv_bits": 3}))
# Table 4: (label, method, fuse) of the post-training baselines of b1.58_a8.
PTQ_RUNS = (("quarot_unfused", "quarot", False),
            ("spinquant_unfused", "spinquant", False),
            ("quarot_fused", "quarot", True),
            ("spinquant_fused", "spinquant", True))


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes of one study; `quick` is the CI smoke test of the same code."""
  vocab_size: int = 2048
  d_model: int = 128
  d_ff: int = 384
  num_heads: int = 4
  num_layers: int = 4
  seq_len: int = 128
  batch_size: int = 16
  steps: int = 800
  warmup_steps: int = 50
  lr: float = 3e-3
  lr_stage2: float = 2e-3
  valid_fraction: float = 0.1
  max_valid_docs: int = 0       # 0: all held-out documents
  analysis_seqs: int = 8
  calib_samples: int = 128      # SpinQuant rows (the paper: 800)
  calib_steps: int = 100
  calib_lr: float = 1.5
  seeds: tuple[int, ...] = (0, 1, 2)
  seed: int = 0                 # the replica being run (one of seeds)

  @property
  def a4_start(self) -> int:
    return self.steps - max(1, round(self.steps * A4_FRACTION))

  @property
  def ckpt_every(self) -> int:
    """A divisor of a4_start, so the a8 parents keep the a4 start step."""
    for k in (4, 3, 2):
      if self.a4_start % k == 0 and self.a4_start // k >= 1:
        return self.a4_start // k
    return self.a4_start


QUICK = Settings(vocab_size=320, d_model=32, d_ff=64, num_heads=2, num_layers=1,
                 seq_len=32, batch_size=8, steps=6, warmup_steps=2,
                 max_valid_docs=6, analysis_seqs=2, calib_samples=8,
                 calib_steps=2, seeds=(0,))


def replica(out: str, seed: int) -> str:
  """The directory of one seed's runs, results and PTQ runs."""
  return os.path.join(out, f"seed{seed}")


# ---------------------------------------------------------------------------
# Data: one split and one tokenizer for every run.

_WIKI_TITLE = re.compile(r"^ = [^=].* = $", re.M)


def split_text(text: str) -> list[str]:
  """Documents of a text: WikiText articles (at ' = Title = ' lines), else
  blank-line separated paragraphs."""
  starts = [m.start() for m in _WIKI_TITLE.finditer(text)]
  if len(starts) >= 10:
    bounds = starts + [len(text)]
    return [text[a:b].strip("\n") for a, b in zip(bounds, bounds[1:])
            if text[a:b].strip()]
  return split_documents(text, "blank_line")


def prepare_data(path: str, out: str, s: Settings) -> dict:
  """Write data/train.txt, data/valid.txt (the last valid_fraction of the
  documents, in order) and data/tokenizer.model; returns their description."""
  data_dir = os.path.join(out, "data")
  info_path = os.path.join(data_dir, "data.json")
  if os.path.exists(info_path):
    with open(info_path) as f:
      return json.load(f)
  if not os.path.isfile(path):
    raise MissingInput(f"--data: {path} is not a file")
  with open(path, encoding="utf-8", errors="replace") as f:
    docs = split_text(f.read())
  n_valid = max(1, round(len(docs) * s.valid_fraction))
  if len(docs) - n_valid < 2:
    raise InputError(f"--data: {path} has {len(docs)} documents; need at "
                     "least 3 to split into train and validation")
  train, valid = docs[:-n_valid], docs[-n_valid:]
  os.makedirs(data_dir, exist_ok=True)
  for name, part in (("train", train), ("valid", valid)):
    with open(os.path.join(data_dir, f"{name}.txt"), "w") as f:
      f.write("\n\n".join(part))
  t0 = time.time()
  tok = tokenizer_lib.train_tokenizer(train, s.vocab_size)
  tok.save(os.path.join(data_dir, rundir.TOKENIZER))
  info = {"source": os.path.abspath(path), "documents": len(docs),
          "train_documents": len(train), "valid_documents": len(valid),
          "train_tokens": sum(len(tok.encode(d)) + 2 for d in train),
          "valid_tokens": sum(len(tok.encode(d)) + 2 for d in valid),
          "seconds": time.time() - t0}
  with open(info_path, "w") as f:
    json.dump(info, f, indent=2)
  return info


def valid_documents(out: str, s: Settings) -> list[str]:
  with open(os.path.join(out, "data", "valid.txt")) as f:
    docs = split_text(f.read())
  return docs[:s.max_valid_docs] if s.max_valid_docs else docs


# ---------------------------------------------------------------------------
# Training.


def run_config(run: Run, out: str, s: Settings,
               data_dir: str) -> ml_collections.ConfigDict:
  """The config of `run` in the replica directory `out` (seed s.seed)."""
  c = defaults.tiny_config(act_bits=run.act_bits)
  c.seed = s.seed
  c.model.update(variant=run.variant, vocab_size=s.vocab_size,
                 activation=run.activation,
                 d_model=s.d_model, d_ff=s.d_ff, num_heads=s.num_heads,
                 num_layers=s.num_layers, seq_len=s.seq_len)
  c.quant.hadamard = run.hadamard
  c.quant.mean_centre = run.mean_centre
  # float matmuls, as the committed study was trained (same gradients as
  # int8; its forward differs by float rounding)
  c.quant.train_matmul = "float"
  c.data.update(source="text", paths=os.path.join(data_dir, "train.txt"),
                tokenizer=os.path.join(data_dir, rundir.TOKENIZER),
                batch_size=s.batch_size, eval_fraction=0.02)
  c.opt.update(lr=s.lr, lr_stage2=s.lr_stage2,
               warmup_steps=min(s.warmup_steps, s.steps // 2))
  c.train.update(num_steps=s.steps, stop_step=-1, ckpt_every=s.ckpt_every,
                 keep_ckpts=0, log_every=max(1, min(20, s.steps // 10)),
                 eval_batches=2, async_ckpt=False)
  if run.parent:
    c.init_from = os.path.join(out, "runs", run.parent, rundir.CHECKPOINTS,
                               str(s.a4_start))
    c.train.require_init_from = True
  return c


def is_trained(workdir: str, s: Settings) -> bool:
  summary = rundir.RunDir(workdir).read_summary()
  return bool(summary) and summary.get("final_step") == s.steps and \
      not summary.get("preempted")


def train_run(run: Run, out: str, s: Settings, data_dir: str) -> bool:
  """Train (or resume) one run of the replica `out`; False if it was
  already finished."""
  workdir = os.path.join(out, "runs", run.name)
  if is_trained(workdir, s):
    return False
  logging.info("study: training %s (seed %d)", run.name, s.seed)
  trainer.train(run_config(run, out, s, data_dir), workdir)
  return True


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def train_seconds(workdir: str) -> float:
  """Wall time of a run from its train.log: per session (each starts with
  its 'devices:' line), last minus first timestamp, summed; an interrupted
  and resumed run counts its sessions, not the gap between them."""
  import datetime
  total, first, last = 0.0, None, None
  with (rundir.RunDir(workdir) / rundir.LOG).open() as f:
    for line in f:
      m = _STAMP.match(line)
      if not m:
        continue
      t = datetime.datetime.fromisoformat(m.group(1)).timestamp() + \
          int(m.group(2)) / 1000
      if " devices: " in line and first is not None:
        total += last - first
        first = None
      first = t if first is None else first
      last = t
  return total + (last - first if first is not None else 0.0)


def loss_curve(workdir: str) -> tuple[list[int], list[float]]:
  steps, losses = [], []
  with (rundir.RunDir(workdir) / rundir.METRICS).open() as f:
    for line in f:
      record = json.loads(line)
      if "loss" in record and "step" in record:
        steps.append(int(record["step"]))
        losses.append(float(record["loss"]))
  return steps, losses


def final_train_loss(workdir: str, last: int = 20) -> float:
  """Mean of the last `last` logged training losses (NaN if it diverged)."""
  _, losses = loss_curve(workdir)
  tail = losses[-last:]
  return sum(tail) / len(tail) if tail else math.nan
