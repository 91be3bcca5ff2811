"""The optimized HLO text of a compiled XLA program, parsed: instructions by
computation, array shapes and their bytes, collective group sizes.

`parse(compiled.as_text())` gives {computation: [Instruction]} and the entry
computation's name; hlo_stats.py walks it.
"""
from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0,
}
ARRAY_RE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\]")
NAME_RE = re.compile(r"%([\w.\-]+)")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute")
# Instructions that move no data of their own.
FREE_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
         "while", "call", "conditional", "after-all", "partition-id",
         "replica-id", "iota", "opt-barrier", "copy-done", "async-done",
         "all-gather-done", "all-reduce-done", "collective-permute-done",
         "send-done", "recv-done"}


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array in a (possibly tuple) shape string."""
  return [(d, tuple(int(x) for x in dims.split(",") if x))
          for d, dims in ARRAY_RE.findall(shape)]


def shape_bytes(shape: str) -> float:
  return sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in arrays(shape))


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  literal: str = ""   # the text inside the parentheses (a constant's value)

  def attr(self, key: str) -> str | None:
    m = re.search(r"\b" + re.escape(key) + r"=", self.attrs)
    if not m:
      return None
    return _balanced_value(self.attrs, m.end())


def _balanced_value(text: str, i: int) -> str:
  """The attribute value starting at text[i]: up to the next top-level ','."""
  depth, j = 0, i
  while j < len(text):
    c = text[j]
    if c in "({[":
      depth += 1
    elif c in ")}]":
      if depth == 0:
        break
      depth -= 1
    elif c == "," and depth == 0:
      break
    elif c == '"':
      j = text.index('"', j + 1)
    j += 1
  return text[i:j].strip()


def _split_instruction(line: str) -> Instruction | None:
  body = line.strip()
  if body.startswith("ROOT "):
    body = body[5:]
  m = re.match(r"%?([\w.\-]+) = ", body)
  if not m:
    return None
  rest = body[m.end():]
  if rest.startswith("("):  # tuple shape
    depth = 0
    for j, c in enumerate(rest):
      depth += c == "("
      depth -= c == ")"
      if depth == 0:
        break
    shape, rest = rest[:j + 1], rest[j + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  depth, start = 0, op.end() - 1
  for j in range(start, len(rest)):
    depth += rest[j] == "("
    depth -= rest[j] == ")"
    if depth == 0:
      break
  inside = rest[start + 1:j]
  return Instruction(m.group(1), shape, op.group(1), NAME_RE.findall(inside),
                     rest[j + 1:], inside.strip())


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """{computation name: instructions} and the entry computation's name."""
  comps: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if not line.strip() or line.startswith(("HloModule", "//", "FileNames",
                                            "FunctionNames", "FileLocations",
                                            "StackFrames")):
      continue
    if not line[0].isspace():
      if line.rstrip().endswith("{"):
        is_entry = line.startswith("ENTRY ")
        name = line[6:] if is_entry else line
        current = name.split()[0].lstrip("%")
        comps[current] = []
        if is_entry:
          entry = current
      elif line.startswith("}"):
        current = None
      continue
    if current is not None:
      inst = _split_instruction(line)
      if inst is not None:
        comps[current].append(inst)
  return comps, entry


def group_size(inst: Instruction, num_devices: int) -> int:
  """Devices in one replica group of a collective."""
  groups = inst.attr("replica_groups")
  if groups is None:
    pairs = inst.attr("source_target_pairs")
    return 2 if pairs else num_devices
  if groups.startswith("mesh["):
    tail = inst.attrs[inst.attrs.find("replica_groups=") + 15:]
    m = re.match(r"mesh\[(.*?)\]\s*\{(.*?)\}", tail)
    if m:
      sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
      axes = re.findall(r"'([^']+)'", m.group(2))
      return math.prod(int(sizes[a]) for a in axes)
  m = re.match(r"\[(\d+),(\d+)\]<=", groups)
  if m:
    return int(m.group(2))
  m = re.match(r"\{\{([^}]*)\}", groups)
  if m:
    return len([x for x in m.group(1).split(",") if x.strip()])
  return num_devices


MEGASCALE_SEND_RE = re.compile(r"\s*%send(?:\.\d+)? = \((\S+)")
MEGASCALE_TYPE_RE = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')


def dcn_transfers(text: str) -> list[tuple[str, str, float]]:
  """(transfer type, array shape, bytes) of every cross-slice (DCN) send in
  a multi-slice TPU program: the megascale runtime's host transfers, once per
  site in the text (a site inside a loop runs once per iteration)."""
  out = []
  for line in text.splitlines():
    m = MEGASCALE_SEND_RE.match(line)
    t = MEGASCALE_TYPE_RE.search(line)
    if m and t:
      shape = m.group(1).rstrip(",")
      out.append((t.group(1), shape, shape_bytes(shape)))
  return out
