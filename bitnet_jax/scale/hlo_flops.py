"""Matmul FLOPs of one instruction of an optimized XLA program: `dot`,
`convolution` (the TPU writes matmuls as convolutions whose windows slide
over padded or dilated axes: only valid window positions count, as in XLA's
cost model), and the library calls XLA does not count itself: cuDNN fused
attention and cuBLAS GEMMs. hlo_stats.py applies them over the program."""
from __future__ import annotations

import math
import re

import numpy as np

from bitnet_jax.kernels import h_input
from bitnet_jax.scale.hlo_text import Instruction, arrays

F32_DEFAULT = "f32 default"  # float32 operands, default precision
INT_DTYPES = ("s8", "u8", "s4", "u4")


def _conv_valid_positions(out: int, window: int, inp: int, stride: int,
                          pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
  """(output position, window position) pairs that read a real input element."""
  o = np.arange(out)[:, None]
  k = np.arange(window)[None, :]
  pos = o * stride + k * rhs_dil - pad_lo
  ok = (pos >= 0) & (pos <= (inp - 1) * lhs_dil) & (pos % lhs_dil == 0)
  return int(ok.sum())


def _window_fields(window: str, rank: int) -> dict[str, list[int]]:
  fields = {"size": [1] * rank, "stride": [1] * rank, "lhs_dilate": [1] * rank,
            "rhs_dilate": [1] * rank, "pad_lo": [0] * rank}
  for key, value in re.findall(r"(\w+)=([\d_x\-]+)", window):
    parts = value.split("x")
    if key == "pad":
      fields["pad_lo"] = [int(p.split("_")[0]) for p in parts]
    elif key in fields:
      fields[key] = [int(p) for p in parts]
  return fields


def conv_flops(inst: Instruction, lhs: str, rhs: str) -> float:
  """2 x multiply-adds of a convolution, counting only valid positions."""
  labels = inst.attr("dim_labels") or ""
  lhs_l, rest = labels.split("_")
  rhs_l, out_l = rest.split("->")
  (_, lhs_dims), = arrays(lhs)[:1]
  (_, rhs_dims), = arrays(rhs)[:1]
  (_, out_dims), = arrays(inst.shape)[:1]
  spatial = [c for c in out_l if c.isdigit()]
  window = inst.attr("window") or ""
  w = _window_fields(window, len(spatial))
  valid = 1
  for i, c in enumerate(spatial):
    valid *= _conv_valid_positions(
        out_dims[out_l.index(c)], rhs_dims[rhs_l.index(c)],
        lhs_dims[lhs_l.index(c)], w["stride"][i], w["pad_lo"][i],
        w["lhs_dilate"][i], w["rhs_dilate"][i])
  groups = int(inst.attr("feature_group_count") or 1)
  in_features = lhs_dims[lhs_l.index("f")] // groups
  macs = (out_dims[out_l.index("b")] * out_dims[out_l.index("f")]
          * in_features * valid)
  return 2.0 * macs


def dot_flops(inst: Instruction, lhs: str) -> float:
  (_, lhs_dims), = arrays(lhs)[:1]
  contracting = inst.attr("lhs_contracting_dims") or "{}"
  k = math.prod(lhs_dims[int(i)] for i in re.findall(r"\d+", contracting))
  (_, out_dims), = arrays(inst.shape)[:1]
  return 2.0 * math.prod(out_dims) * k


_FMHA_RE = re.compile(r'"intermediate_tensor_shape":\s*\{[^}]*?"dimensions":'
                      r'\s*\[([^\]]*)\]')
_GEMM_CONTRACT_RE = re.compile(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]')


PALLAS_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton")


def custom_call_name(inst: Instruction) -> str:
  """A custom call's name in reports: its target, and for a Pallas kernel
  (Mosaic, Triton) the kernel's own name
  (`bitnet_h_input_fwd.3` -> `tpu_custom_call:bitnet_h_input_fwd`)."""
  return call_name((inst.attr("custom_call_target") or "?").strip('"'),
                   inst.name, inst.attrs)


# a Triton call is named `pallas_call.N`; its kernel's name is in the
# serialized module it carries
_TRITON_NAME_RE = re.compile(r'name = \\?"([\w.\-]+)\\?", num_stages')


def call_name(target: str, instruction: str, attrs: str = "") -> str:
  """The target, and for a Pallas kernel its name: a Mosaic call's
  instruction name, a Triton call's kernel name (from `attrs`)."""
  if target not in PALLAS_TARGETS:
    return target
  m = _TRITON_NAME_RE.search(attrs) if "triton" in target else None
  return target + ":" + (m.group(1) if m else
                         re.sub(r"[.]\d+$", "", instruction))


def custom_call_flops(inst: Instruction, operand_shapes: list[str]) -> float:
  """Matmul FLOPs of a call XLA does not count: cuDNN attention, cuBLAS
  GEMMs and this project's Pallas kernels (kernels/h_input.py: the MXU
  passes of its Hadamard); 0 for any other custom call."""
  target = inst.attr("custom_call_target") or ""
  kernel = custom_call_name(inst).split(":")[-1]
  if kernel.startswith(("splash_mha_", "splash_mqa_")):
    return splash_flops(kernel, inst.attrs, operand_shapes)
  if kernel in (h_input.FORWARD_NAME, h_input.BACKWARD_NAME):
    x = arrays(operand_shapes[0 if kernel == h_input.FORWARD_NAME else 2])
    if not x:
      return 0.0
    dtype, dims = x[0]  # [rows, n] (Mosaic) or [rows, A, B] (Triton)
    return h_input.mxu_flops(dims[0], math.prod(dims[1:]),
                             "float32" if dtype == "f32" else "bfloat16",
                             h_input.TARGET_IMPLS.get(target.strip('"'),
                                                      "mosaic"),
                             backward=kernel == h_input.BACKWARD_NAME)
  if "__cudnn$fmha" in target:
    m = _FMHA_RE.search(inst.attrs)
    q = arrays(operand_shapes[0])
    if not (m and q):
      return 0.0
    b, n, t, s = (int(x) for x in re.findall(r"\d+", m.group(1))[:4])
    head = q[0][1][-1]
    flops = 4.0 * b * n * t * s * head
    if '"mask_type": "CAUSAL"' in inst.attrs or \
        '"mask_type": "PADDING_CAUSAL"' in inst.attrs:
      visible = sum(min(s, s - t + i + 1) for i in range(t)) if s >= t else \
          t * s / 2
      flops *= visible / (t * s)
    return 2.5 * flops if "Backward" in target else flops
  if "__cublas$gemm" in target or "__cublas$lt$matmul" in target:
    m = _GEMM_CONTRACT_RE.search(inst.attrs)
    lhs = arrays(operand_shapes[0])
    out = arrays(inst.shape)
    if not (m and lhs and out):
      return 0.0
    k = math.prod(lhs[0][1][int(i)] for i in re.findall(r"\d+", m.group(1)))
    return 2.0 * math.prod(out[0][1]) * k
  return 0.0


# matmuls per (query block, key block) pair of each splash kernel: forward
# q k^T and p v; dq: q k^T, do v^T, ds k; dkv: q k^T, do v^T, p^T do, ds^T q
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
_BLOCK_RE = r'block_{}\\?"?:\s*(\d+)'


def splash_flops(kernel: str, attrs: str, operand_shapes: list[str]) -> float:
  """FLOPs of a splash attention kernel (kernels/splash.py: causal): 2 T_q
  T_k E per matmul per head and batch row, over the (query, key) blocks the
  kernel computes (a causal mask skips the blocks above the diagonal; the
  block sizes are in the call's metadata)."""
  phase = next((p for p in SPLASH_MATMULS if f"_{p}" in kernel), None)
  q = max((dims for s in operand_shapes for dtype, dims in arrays(s)
           if len(dims) == 4 and dtype in ("bf16", "f32", "f16")),
          key=lambda d: d[1], default=None)
  if phase is None or q is None:
    return 0.0
  b, heads, t, e = q
  suffix = {"fwd": "", "dq": "_dq", "dkv": "_dkv"}[phase]
  blocks = []
  for axis in ("q", "kv"):
    m = (re.search(_BLOCK_RE.format(axis + suffix), attrs) or
         re.search(_BLOCK_RE.format(axis), attrs))
    blocks.append(int(m.group(1)) if m else t)
  bq, bk = blocks
  computed = sum(1 for i in range(-(-t // bq)) for j in range(-(-t // bk))
                 if j * bk <= (i + 1) * bq - 1)
  return 2.0 * SPLASH_MATMULS[phase] * b * heads * computed * bq * bk * e


def call_sites(text: str) -> dict[str, int]:
  """custom call (custom_call_name: the target, and a Pallas kernel's
  name) -> sites in the optimized program."""
  out: dict[str, int] = {}
  for m in re.finditer(
      r'%([\w.\-]+) = [^\n]*?custom_call_target="([^"]+)"([^\n]*)', text):
    name = call_name(m.group(2), m.group(1), m.group(3))
    out[name] = out.get(name, 0) + 1
  return out


OWN_KERNELS = (h_input.FORWARD_NAME, h_input.BACKWARD_NAME)


def attention_kind(text: str) -> str:
  """Which attention the program runs: 'cudnn' (fused flash attention
  custom calls), 'pallas' (a Pallas / Mosaic kernel other than this
  project's H-BitLinear input) or 'xla' (the scores materialised by XLA's
  own ops)."""
  calls = call_sites(text)
  if any("__cudnn$fmha" in t for t in calls):
    return "cudnn"
  if any(t.split(":")[0] in PALLAS_TARGETS and
         t.split(":")[-1] not in OWN_KERNELS for t in calls):
    return "pallas"
  return "xla"
