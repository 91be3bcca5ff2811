"""What a compiled XLA program does per device, read from its optimized HLO.

`compiled.cost_analysis()` counts a while loop's body once, so a step with
scanned layers (and a microbatch loop around them) is under-counted by the
trip counts. This module walks `compiled.as_text()` itself and applies them:

  matmul FLOPs   every `dot` and `convolution` (TPU writes matmuls as
                 convolutions with windows; valid window positions are
                 counted exactly as XLA's cost model does), by operand dtype;
                 float32 operands at default precision (TF32 / one bf16
                 pass) apart from those at Precision.HIGHEST ('f32')
  HBM bytes      operands + result of every instruction outside fusions (a
                 fusion counts at its boundary): an estimate of memory traffic.
                 A fusion operand that the fusion only reads through
                 dynamic-slice (a scanned layer's slice of a stacked buffer)
                 counts the slices read, and a buffer updated in place by
                 dynamic-update-slice counts the update written, not the
                 whole buffer
  custom calls   cuDNN attention (`__cudnn$fmha*`): 4 B N T S E FLOPs
                 forward (Q K^T and P V), 2.5x that backward (five matmuls),
                 times the visible share of a causal mask; cuBLAS GEMMs
                 (`__cublas$gemm`, `__cublas$lt$matmul`) by their dot
                 dimensions; this project's Pallas kernels (Mosaic
                 `tpu_custom_call`, named by the kernel) by the matmul
                 passes they run (kernels/h_input.mxu_flops). Their bytes
                 are operands + results like any op; `custom_calls()`
                 lists each with its count, FLOPs and bytes
  collectives    all-gather / reduce-scatter / all-reduce / all-to-all /
                 collective-permute: count, payload and ring traffic per device
                 (all-gather (n-1)/n of the result, reduce-scatter (n-1)/n of
                 the operand, all-reduce twice that of its buffer); one
                 channel is one collective, however many fusions (async
                 start / steps / done) carry its instruction; with the
                 devices' hosts given, whether its group spans hosts

Trip counts come from a while's `known_trip_count` or from its condition
(`i < N` on a counter whose initial value is a constant). Everything is per
device: SPMD programs are written for one partition.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable

from bitnet_jax.scale.hlo_flops import (F32_DEFAULT, conv_flops,
                                        custom_call_flops, custom_call_name,
                                        dot_flops)
from bitnet_jax.scale.hlo_text import (ARRAY_RE, COLLECTIVES, DTYPE_BYTES, FREE_OPS,
                                 NAME_RE, Instruction, arrays, group_size,
                                 parse, replica_groups, shape_bytes)

@dataclasses.dataclass
class Collective:
  kind: str
  name: str
  shape: str
  group: int
  payload: float       # bytes of the buffer (result; operand for reduce-scatter)
  traffic: float       # ring bytes sent per device
  count: float         # executions per step (trip counts applied)
  hosts: int = 1       # hosts one group spans (1: within a host)
  # payload bytes by element type (a combined collective moves several arrays)
  payload_by_dtype: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Op:
  """One top-level instruction (a fusion counts as one), as executed."""
  name: str
  flops: dict[str, float]   # operand dtype -> matmul FLOPs per execution
  bytes: float              # HBM bytes per execution (operands + result)
  count: float
  custom_call: str = ""     # hlo_flops.custom_call_name, for custom calls


@dataclasses.dataclass
class ProgramStats:
  """Per-device totals of one execution of the program."""
  ops: list[Op]
  collectives: list[Collective]
  unknown_trip_counts: list[str]     # while loops counted once (no trip count)

  @property
  def flops(self) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for op in self.ops:
      for dtype, f in op.flops.items():
        out[dtype] += f * op.count
    return dict(out)

  @property
  def matmul_flops(self) -> float:
    return sum(self.flops.values())

  @property
  def hbm_bytes(self) -> float:
    return sum(op.bytes * op.count for op in self.ops)

  def custom_calls(self) -> dict[str, dict[str, float]]:
    """Per custom call (name): executions, matmul FLOPs and HBM bytes per
    step, the costs the roofline charges it (XLA's own cost analysis
    counts none of a Pallas kernel)."""
    out: dict[str, dict[str, float]] = {}
    for op in self.ops:
      if op.custom_call:
        row = out.setdefault(op.custom_call, {"count": 0.0, "flops": 0.0,
                                              "bytes": 0.0})
        row["count"] += op.count
        row["flops"] += sum(op.flops.values()) * op.count
        row["bytes"] += op.bytes * op.count
    return out

  def collective_bytes(self, kind: str | None = None, traffic=False,
                       inter_host: bool | None = None) -> float:
    """Payload (or ring traffic) bytes per device; inter_host True / False:
    only the collectives whose groups span hosts / stay within one."""
    return sum((c.traffic if traffic else c.payload) * c.count
               for c in self.collectives if (kind is None or c.kind == kind)
               and (inter_host is None or (c.hosts > 1) == inter_host))

  def by_kind(self) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for c in self.collectives:
      row = out.setdefault(c.kind, {"count": 0.0, "payload_bytes": 0.0,
                                    "traffic_bytes": 0.0})
      row["count"] += c.count
      row["payload_bytes"] += c.payload * c.count
      row["traffic_bytes"] += c.traffic * c.count
    return out

  def to_json(self) -> dict:
    return {"matmul_flops": self.matmul_flops, "flops_by_dtype": self.flops,
            "hbm_bytes": self.hbm_bytes, "collectives": self.by_kind(),
            "unknown_trip_counts": self.unknown_trip_counts}


class _Walker:
  def __init__(self, comps, num_devices, hosts=None):
    self.comps, self.num_devices = comps, num_devices
    self.hosts = list(hosts) if hosts is not None else None
    self.ops: list[Op] = []
    self.collectives: list[Collective] = []
    self.unknown: list[str] = []
    self.shapes = {c: {i.name: i.shape for i in insts}
                   for c, insts in comps.items()}
    self._fused: dict[str, dict[str, float]] = {}
    self._channels: set[str] = set()

  def trip_count(self, comp: str, inst: Instruction) -> int | None:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
    if known:
      return int(known.group(1))
    cond = (inst.attr("condition") or "").lstrip("%")
    insts = {i.name: i for i in self.comps.get(cond, [])}
    root = self.comps.get(cond, [None])[-1]
    if root is None or root.opcode != "compare" or len(root.operands) != 2:
      return None
    direction = re.search(r"direction=(\w+)", root.attrs)
    a, b = (insts.get(o) for o in root.operands)
    if not (a and b and direction):
      return None
    d = direction.group(1)
    if a.opcode == "constant":
      a, b = b, a
      d = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(d, d)
    if b.opcode != "constant" or a.opcode != "get-tuple-element":
      return None
    bound = _const(b)
    index = int(re.search(r"index=(\d+)", a.attrs).group(1))
    start = self._init_value(comp, inst, index)
    if d == "LT":
      return max(0, bound - start)
    if d == "LE":
      return max(0, bound - start + 1)
    return None

  def _init_value(self, comp: str, inst: Instruction, index: int) -> int:
    insts = {i.name: i for i in self.comps[comp]}
    init = insts.get(inst.operands[0]) if inst.operands else None
    if init is not None and init.opcode == "tuple" and index < len(init.operands):
      src = insts.get(init.operands[index])
      if src is not None and src.opcode == "constant":
        return _const(src)
    return 0

  def _matmul_flops(self, comp: str, inst: Instruction) -> dict[str, float]:
    shapes = [self.shapes[comp].get(o, "") for o in inst.operands]
    dtype = (arrays(shapes[0]) or [("?", ())])[0][0] if shapes else "?"
    if dtype == "f32" and "operand_precision={highest" not in inst.attrs:
      dtype = F32_DEFAULT  # TF32 / one bf16 pass, not full float32
    if inst.opcode == "dot" and shapes:
      return {dtype: dot_flops(inst, shapes[0])}
    if inst.opcode == "convolution" and len(shapes) == 2:
      return {dtype: conv_flops(inst, *shapes)}
    if inst.opcode == "custom-call" and shapes:
      flops = custom_call_flops(inst, shapes)
      return {dtype: flops} if flops else {}
    return {}

  def _fusion_flops(self, comp: str, scale: float) -> dict[str, float]:
    """Matmul FLOPs inside a fused computation (collectives noted too)."""
    if comp not in self._fused:
      total: dict[str, float] = collections.defaultdict(float)
      for inst in self.comps[comp]:
        for dtype, f in self._matmul_flops(comp, inst).items():
          total[dtype] += f
        for callee in self._callees(inst):
          for dtype, f in self._fusion_flops(callee, scale).items():
            total[dtype] += f
      self._fused[comp] = dict(total)
    for inst in self.comps[comp]:
      self._maybe_collective(comp, inst, scale)
    return self._fused[comp]

  def _callees(self, inst: Instruction) -> list[str]:
    out = []
    keys = ["calls", "branch_computations", "true_computation",
            "false_computation"]
    if inst.opcode == "call":  # e.g. a shard_map body kept as a call
      keys.append("to_apply")
    for key in keys:
      value = inst.attr(key)
      if value:
        out += [c for c in (NAME_RE.findall(value) or [value.lstrip("%")])
                if c in self.comps]
    return out

  def walk(self, comp: str, scale: float) -> None:
    shapes = self.shapes[comp]
    for inst in self.comps[comp]:
      op = inst.opcode
      if op == "while":
        trips = self.trip_count(comp, inst)
        if trips is None:
          self.unknown.append(inst.name)
          trips = 1
        for key in ("body", "condition"):
          callee = (inst.attr(key) or "").lstrip("%")
          if callee in self.comps:
            self.walk(callee, scale * trips)
        continue
      self._maybe_collective(comp, inst, scale)
      if op == "fusion":
        flops: dict[str, float] = collections.defaultdict(float)
        for callee in self._callees(inst):
          for dtype, f in self._fusion_flops(callee, scale).items():
            flops[dtype] += f
      else:
        flops = self._matmul_flops(comp, inst)
        for callee in self._callees(inst):  # call, conditional, async ops
          self.walk(callee, scale)
      if op in FREE_OPS:
        continue
      held = [a for o in inst.operands for a in arrays(shapes.get(o, ""))]
      held += arrays(inst.shape)
      buffers = self._collective_buffers(inst)
      nbytes = sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in held
                   if (d, dims) not in buffers)
      if op == "fusion":
        nbytes -= self._sliced_savings(inst, shapes)
      self.ops.append(Op(inst.name, dict(flops), nbytes, scale,
                         custom_call_name(inst) if op == "custom-call"
                         else ""))

  def _sliced_savings(self, inst: Instruction, shapes) -> float:
    """Bytes a fusion does not move although its operands / result hold
    them: a parameter read only through dynamic-slice moves the slices; a
    parameter updated in place by the root's dynamic-update-slice (the
    result aliases it) moves the update, once, not the buffer twice."""
    callees = self._callees(inst)
    if len(callees) != 1:
      return 0.0
    body = self.comps[callees[0]]
    params = {}
    for i in body:
      if i.opcode == "parameter" and re.fullmatch(r"\d+", i.literal):
        params[i.name] = int(i.literal)
    users: dict[str, list[Instruction]] = collections.defaultdict(list)
    for i in body:
      for o in i.operands:
        users[o].append(i)
    root = body[-1] if body else None
    saved = 0.0
    for name, index in params.items():
      if index >= len(inst.operands):
        continue
      full = shape_bytes(shapes.get(inst.operands[index], ""))
      uses = users.get(name, [])
      if uses and all(u.opcode == "dynamic-slice" and u.operands[0] == name
                      for u in uses):
        saved += max(0.0, full - sum(shape_bytes(u.shape) for u in uses))
      elif (root is not None and root.opcode == "dynamic-update-slice"
            and root.operands[0] == name and uses == [root]
            and shape_bytes(root.shape) == full):
        update = shape_bytes(self.shapes[callees[0]].get(root.operands[1], ""))
        saved += max(0.0, 2 * full - update)  # operand + result -> update
    return saved

  def _collective_buffers(self, inst: Instruction) -> set:
    """Arrays of a collective carried by this fusion (async collective
    fusions pass its buffers through start, steps and done): moved by the
    interconnect, not HBM traffic of the fusion."""
    out = set()
    for callee in self._callees(inst):
      comp_shapes = self.shapes[callee]
      for i in self.comps[callee]:
        base = i.opcode[:-6] if i.opcode.endswith("-start") else i.opcode
        if base in COLLECTIVES:
          out.update(arrays(i.shape))
          for o in i.operands:
            out.update(arrays(comp_shapes.get(o, "")))
    return out

  def _maybe_collective(self, comp, inst, scale):
    base = inst.opcode[:-6] if inst.opcode.endswith("-start") else inst.opcode
    if base not in COLLECTIVES:
      return
    # The TPU splits one asynchronous collective over several fusions (start,
    # steps, done), each holding the same instruction: one channel, one op.
    channel = re.search(r"channel_id=(\d+)", inst.attrs)
    if channel:
      if channel.group(1) in self._channels:
        return
      self._channels.add(channel.group(1))
    operand_shapes = [self.shapes[comp].get(o, "") for o in inst.operands]
    n = max(1, group_size(inst, self.num_devices))
    results = arrays(inst.shape)
    if inst.opcode.endswith("-start") and inst.shape.startswith("("):
      # async start ops return (operands, results[, scratch]): keep the result
      results = results[len(operand_shapes):2 * len(operand_shapes)]
    out = sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in results)
    operands = [a for s in operand_shapes for a in arrays(s)]
    operand = sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in operands)
    frac = (n - 1) / n
    if base == "all-gather":
      payload, traffic = out, out * frac
    elif base == "reduce-scatter":
      payload, traffic = operand, operand * frac
    elif base == "all-reduce":
      payload = operand or out
      traffic = 2 * payload * frac
    elif base == "all-to-all":
      payload = operand or out
      traffic = payload * frac
    else:  # collective-permute
      payload = traffic = operand or out
    moved = operands if base == "reduce-scatter" or not results else results
    by_dtype: dict[str, float] = collections.defaultdict(float)
    for d, dims in moved:
      by_dtype[d] += DTYPE_BYTES[d] * math.prod(dims)
    self.collectives.append(Collective(base, inst.name, inst.shape, n, payload,
                                       traffic, scale, self._hosts_spanned(inst),
                                       dict(by_dtype)))

  def _hosts_spanned(self, inst: Instruction) -> int:
    """The most hosts one group (or one source-target pair) of the
    collective spans; 1 without host information."""
    if self.hosts is None or len(set(self.hosts)) == 1:
      return 1
    groups = replica_groups(inst, self.num_devices)
    if groups is None:  # an unknown format: assume the worst
      return len(set(self.hosts))
    return max((len({self.hosts[i] for i in g if i < len(self.hosts)})
                for g in groups), default=1)


def _const(inst: Instruction) -> int:
  """The value of a scalar integer constant instruction."""
  return int(inst.literal) if re.fullmatch(r"-?\d+", inst.literal) else 0


def analyze(text: str, num_devices: int, hosts=None) -> ProgramStats:
  """Per-device totals of the program; hosts[i]: the host of the program's
  device i (its device assignment), to tell intra- from inter-host groups."""
  comps, entry = parse(text)
  walker = _Walker(comps, num_devices, hosts)
  walker.walk(entry, 1.0)
  return ProgramStats(walker.ops, walker.collectives, walker.unknown)


def activation_batch_dims(text: str, inner: Iterable[tuple[int, ...]]) -> set:
  """Sizes of the dim just before any occurrence of an `inner` dims sequence
  (e.g. (T, D)) in the program's array shapes: the batch each device holds."""
  found = set()
  for _, dims in ARRAY_RE.findall(text):
    d = tuple(int(x) for x in dims.split(",") if x)
    for pat in inner:
      k = len(pat)
      for i in range(1, len(d) - k + 1):
        if d[i:i + k] == tuple(pat):
          found.add(d[i - 1])
  return found
