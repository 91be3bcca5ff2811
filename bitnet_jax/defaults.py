"""The configuration schema: every field, its default and what it means.

The `model` group and `quant` group (but its training-loop key a4_start_step)
are read as they are by `model_config.ModelConfig` (same names, defaults and
encodings); the other groups by the training loop.

`run_config.RunConfig.from_config` turns a ConfigDict into the typed run
config and holds every rule on the fields.

Config files in configs/ call `base_config()` (or `paper_config(size)`) and
override what differs, so each file stays short and every field is documented
once, here. Groups: config.model, config.quant, config.opt, config.data,
config.mesh, config.train (loop, logging, checkpoints), plus top-level `seed`
and `init_from`.
"""
from __future__ import annotations

import ml_collections

from bitnet_jax.errors import ConfigError

# Table 8 (shapes) and Table 9 (stage-1 -> stage-2 peak learning rates).
PAPER_SIZES = {
    "400m": dict(d_model=1024, d_ff=4096, num_heads=16, num_layers=24,
                 lr=1.8e-3, lr_stage2=1.2e-3),
    "1p3b": dict(d_model=2048, d_ff=8192, num_heads=32, num_layers=18,
                 lr=1.2e-3, lr_stage2=8e-4),
    "3b": dict(d_model=4096, d_ff=8192, num_heads=32, num_layers=20,
               lr=1.2e-3, lr_stage2=6.4e-4),
    "7b": dict(d_model=4096, d_ff=16384, num_heads=32, num_layers=24,
               lr=1e-3, lr_stage2=6e-4),
}
PAPER_TOKENS = 100_000_000_000   # 100B tokens per model
PAPER_BATCH_TOKENS = 1 << 20     # "1M" tokens per batch
PAPER_SEQ_LEN = 2048
PAPER_A4_FRACTION = 0.05         # last 5B of 100B tokens at 4-bit activations


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                       # seeds parameter init and data order
  c.init_from = ""                 # a8 workdir or step dir to continue from (a4)
  c.init_from_any_variant = False  # allow init_from a run of another variant or
                                   # form (an experiment; see run_identity.py)

  m = c.model = ml_collections.ConfigDict()
  m.variant = "v2"                 # fp | b1.58 | v2 | a4.8
  m.vocab_size = 32000             # tokenizer pieces (LLaMA: 32000)
  m.d_model = 256                  # hidden size
  m.d_ff = 512                     # GLU size (a Hadamard size for v2)
  m.num_heads = 4                  # query heads
  m.num_kv_heads = 0               # key/value heads; 0 = num_heads (MHA)
  m.num_layers = 4                 # decoder blocks
  m.seq_len = 256                  # training context length
  m.rope_theta = 10000.0           # RoPE base
  m.norm_eps = 1e-5                # RMSNorm epsilon
  m.init_std = 0.02                # normal init std of kernels and embedding
  m.dtype = "float32"              # compute dtype: float32 | bfloat16
  m.scan_layers = True             # stack blocks with nn.scan (one compile)
  m.remat = "none"                 # none | full | dots (rematerialisation)
  m.tie_embeddings = False         # share embedding and output head
  m.attention_impl = ""            # "" (by backend: cudnn on GPU, Pallas splash on
                                   # TPU, where they apply; else xla) | xla |
                                   # cudnn | splash | splash_interpret (CPU tests)
  m.attention_block = 0            # splash: block along the sequence (0: 512)
  m.activation = ""                # GLU: "" = the variant's (relu2 for a4.8,
                                   # else swiglu) | swiglu | relu2 (squared ReLU)

  q = c.quant = ml_collections.ConfigDict()
  q.act_bits = 8                   # 8 (absmax INT8) | 4 (absmean INT4)
  q.a4_start_step = -1             # step where act_bits switches 8 -> 4; -1 never
  q.hadamard = "activation"        # v2 rotation: none | activation | weight_and_activation
  q.hadamard_block_size = 64       # fwht: 2 = radix-2 butterfly, >2 = blocked
  q.topk_ratio_o = 0.5             # a4.8 at 4 bits: top-K share of W_o inputs
  q.topk_ratio_down = 0.0          # a4.8 at 4 bits: W_down top-K share; 0 = off
  q.q_bits = 0                     # post-RoPE query bits (Tables 2-3); 0 = off
  q.kv_bits = 0                    # post-RoPE key/value bits; 0 = off
  q.ptq_rotation = "none"          # set by `bitnet_jax.ptq`: none | random_hadamard | learned
  q.ptq_fused = True               # ptq: rotation fused into W_qkv, W_up,gate too
  q.weight_scale = "projection"    # ternary absmean per projection (q, k, v, up,
                                   # gate each its own) | tensor (one per fused kernel)
  q.weights = "latent"             # latent (training) | int8 | packed (exported codes)
  q.train_matmul = "auto"          # latent weights while training: float (fake-
                                   # quantized values) | int8 (integer forward,
                                   # STE backward, int8 FSDP gathers) | auto
                                   # (int8 on TPU, GPU and CPU: the compiled
                                   # estimates and the bench)
  q.mean_centre = False            # v2: H-BitLinear quantizes H x - mu and adds
                                   # Q_w(W) mu back; mu (the token-shared offset
                                   # of H x) is calibrated when 4-bit activations
                                   # start (training/centring.py)
  q.quantized = True               # False: float weights and activations (reference)
  q.input_kernel = ""              # H-BitLinear input (RMSNorm -> H -> quantize):
                                   # "" = by backend (one Pallas kernel where it
                                   # applies: Mosaic on TPU, Triton on GPU; jnp
                                   # stages on CPU) | jnp | mosaic | triton |
                                   # interpret | triton_interpret (CPU tests)

  o = c.opt = ml_collections.ConfigDict()
  o.lr = 1.5e-3                    # stage-1 peak learning rate (Table 9, left)
  o.lr_stage1_end = -1.0           # stage-1 value at the midpoint; -1 = halfway to lr_stage2
  o.lr_stage2 = 1e-3               # stage-2 peak, stepped down to at the midpoint
  o.lr_end = 0.0                   # learning rate at the last step
  o.lr_shape = "linear"            # decay shape within a stage: linear | cosine
  o.warmup_steps = 375             # linear warm-up from 0
  o.stage2_start = 0.5             # fraction of num_steps where stage 2 begins
  o.weight_decay = 0.1             # stage-1 decoupled weight decay
  o.weight_decay_stage2 = 0.0      # stage-2 weight decay
  o.decay_all_params = False       # False: decay only linear kernels
  o.b1 = 0.9                       # Adam beta1
  o.b2 = 0.95                      # Adam beta2
  o.eps = 1e-8                     # Adam epsilon
  o.grad_clip = 1.0                # global-norm clipping; 0 = off

  d = c.data = ml_collections.ConfigDict()
  d.source = "stdlib"              # stdlib | text | jsonl | tfds
  d.paths = ""                     # text/jsonl: comma-separated files or globs
  d.text_field = "text"            # jsonl: the field holding the document
  d.doc_split = "blank_line"       # text: blank_line | file (one doc per file)
  d.tfds_name = ""                 # tfds: dataset name, e.g. c4/en:3.1.0
  d.tfds_data_dir = ""             # tfds: data_dir (local path or bucket)
  d.tfds_train_split = "train"     # tfds: training split
  d.tfds_eval_split = "validation"  # tfds: held-out split
  d.eval_fraction = 0.01           # non-tfds: share of documents held out
  d.tokenizer = ""                 # .model path; "" = train one into the workdir
  d.tokenizer_train_docs = 20000   # documents sampled to train the tokenizer
  d.batch_size = 16                # global batch, sequences of seq_len + 1
  d.packing = "concat"             # concat (chunk the stream) | first_fit (segments)
  d.shuffle_rows = 1024            # packed rows shuffled in windows of this size; 0 = off
  d.worker_count = 0               # grain multiprocess workers; 0 = in-process
  d.prefetch = 2                   # batches prefetched per process
  d.max_docs = 0                   # cap the corpus (0 = all); handy for smoke runs

  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.data = -1                   # data-parallel axis size; -1 = fill
  mesh.fsdp = 1                    # parameter-sharding (ZeRO-3) axis size
  mesh.tensor = 1                  # tensor-parallel axis size
  mesh.dcn_data = -1               # slices (TPU) / hosts (GPU) along data; the
                                   # sizes above are then per slice or host;
                                   # -1 = as many as the devices span (multi-
                                   # host GPU: HSDP, FSDP within a host)
  # logical axis -> mesh axes (see bitnet_jax/training/sharding.py); unlisted names
  # (layers, head_dim, activation_embed, activation_length) are replicated
  mesh.rules = (
      ("activation_batch", ("data", "fsdp")),
      ("activation_mlp", "tensor"),
      ("activation_vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("vocab", "tensor"),
  )

  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 1000               # schedule length (total optimizer steps)
  t.stop_step = -1                 # stop early at this step (-1: see stop_fraction)
  t.stop_fraction = 1.0            # with stop_step -1: stop at round(num_steps * this)
  t.microbatches = 1               # gradient accumulation: microbatches per update
  t.log_every = 10                 # steps between metric lines
  t.eval_every = 0                 # steps between validation losses; 0 = end only
  t.eval_batches = 4               # batches per validation loss
  t.ckpt_every = 200               # steps between checkpoints
  t.keep_ckpts = 3                 # checkpoints kept
  t.async_ckpt = True              # orbax asynchronous saves
  t.analysis_every = 0             # steps between activation summaries; 0 = off
  t.peak_flops = 0.0               # per-device peak FLOP/s for MFU; 0 = look up
  t.require_init_from = False      # refuse to start fresh (a4 continuation configs)
  t.allow_fresh_start = False      # start at step 0 although unreadable steps were set aside
  t.spike_factor = 3.0             # stop when an update's loss exceeds this times
                                   # the median of the last spike_window; 0 = off
  t.spike_window = 50              # updates in that running median
  t.restore_step = -1              # resume this saved step instead of the latest;
                                   # newer steps are set aside (renamed), never deleted
  t.preemption_check_every = 10   # multi-process: steps between agreeing on a
                                   # SIGTERM seen by any process (a tiny collective)
  t.wandb_project = ""             # Weights & Biases project ("" = off; needs
                                   # requirements-ops.txt; WANDB_MODE=offline works)
  t.compile_cache_dir = "default"  # persistent XLA cache: default (~/.cache/bitnet_jax/xla),
                                   # a directory (or gs://), or "" (off)
  t.profile_start = -1             # jax.profiler trace from this step (-1: off) ...
  t.profile_steps = 0              # ... for this many steps, into <workdir>/tensorboard
  return c


def paper_config(size: str, act_bits: int = 8) -> ml_collections.ConfigDict:
  """A Table 8/9 model trained on the paper's budget (100B tokens, 1M batch)."""
  if size not in PAPER_SIZES:
    raise ConfigError(f"unknown paper size {size!r}; one of {list(PAPER_SIZES)}")
  dims = dict(PAPER_SIZES[size])
  c = base_config()
  c.opt.lr = dims.pop("lr")
  c.opt.lr_stage2 = dims.pop("lr_stage2")
  c.model.update(dims)
  c.model.seq_len = PAPER_SEQ_LEN
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.batch_size = PAPER_BATCH_TOKENS // PAPER_SEQ_LEN        # 512
  c.train.num_steps = PAPER_TOKENS // PAPER_BATCH_TOKENS         # 95367
  c.train.ckpt_every = 1000
  c.train.log_every = 50
  c.train.eval_every = 5000
  c.quant.act_bits = act_bits
  c.data.source = "tfds"
  c.data.tfds_name = "c4/en:3.1.0"
  c.data.tokenizer = "tokenizer.model"  # a LLaMA-style 32000-piece model
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c


def tiny_config(act_bits: int = 8) -> ml_collections.ConfigDict:
  """The CPU-sized model of configs/tiny.py and configs/tiny_a4.py."""
  c = base_config()
  c.model.vocab_size = 4096
  c.model.d_model = 128
  c.model.d_ff = 384               # 12 * 32: a Paley-Hadamard size
  c.model.num_heads = 4
  c.model.num_layers = 4
  c.model.seq_len = 128
  c.data.batch_size = 16
  c.data.tokenizer_train_docs = 4000
  c.opt.lr = 3e-3
  c.opt.lr_stage2 = 2e-3
  c.opt.warmup_steps = 50
  c.train.num_steps = 600
  c.train.log_every = 20
  c.train.ckpt_every = 200
  c.quant.act_bits = act_bits
  return c
