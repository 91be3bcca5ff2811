"""The optimized HLO text of a compiled XLA program, parsed: instructions by
computation, array shapes and their bytes, collective group sizes.

`parse(compiled.as_text())` gives {computation: [Instruction]} and the entry
computation's name; hlo_stats.py walks it.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

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


def _logical_lines(text: str):
  """The program's lines with an instruction's continuation lines joined:
  a Pallas call's backend config can hold newlines (splash attention's
  metadata does), which would otherwise read as the end of a computation."""
  pending = None
  for line in text.splitlines():
    header = (line.startswith(("%", "ENTRY ")) and line.rstrip().endswith("{"))
    if pending is not None and line and not line[0].isspace() and not (
        header or line.strip() == "}"):
      pending += "\n" + line
      continue
    if pending is not None:
      yield pending
    pending = line
  if pending is not None:
    yield pending


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """{computation name: instructions} and the entry computation's name."""
  comps: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in _logical_lines(text):
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
  """Devices in one replica group of a collective (a collective-permute: 2)."""
  if inst.attr("source_target_pairs") is not None:
    return 2
  groups = replica_groups(inst, num_devices)
  return len(groups[0]) if groups else num_devices


def replica_groups(inst: Instruction, num_devices: int
                   ) -> list[list[int]] | None:
  """The device groups of a collective: explicit `{{0,1},{2,3}}`, iota
  `[G,S]<=[dims]T(perm)`, empty (all devices), or a collective-permute's
  source-target pairs; None for a format not known here."""
  pairs = inst.attr("source_target_pairs")
  if pairs is not None:
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs)]
  groups = inst.attr("replica_groups")
  if groups is None or groups in ("{}", "{{}}"):
    return [list(range(num_devices))]
  m = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", groups)
  if m:
    shape = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(-1, shape[-1]).tolist()
  if groups.startswith("mesh["):
    return _mesh_groups(inst)
  if groups.startswith("{{"):
    return [[int(x) for x in g.split(",") if x.strip()]
            for g in re.findall(r"\{([\d,\s]*)\}", groups[1:-1])]
  return None


_MESH_GROUPS_RE = re.compile(
    r"mesh\[(.*?)\](?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
    r"\s*\{(.*?)\}")


def _mesh_groups(inst: Instruction) -> list[list[int]] | None:
  """Groups of the mesh form: `mesh['a'=8,'b'=2], device_ids=([2,8]T(1,0))
  {'a'}` = the devices that differ only along the listed mesh axes; mesh
  positions in row-major order hold device_ids (an iota, transposed)."""
  tail = inst.attrs[inst.attrs.find("replica_groups=") + 15:]
  m = _MESH_GROUPS_RE.match(tail)
  if not m:
    return None
  names = re.findall(r"'([^']+)'=(\d+)", m.group(1))
  sizes = [int(n) for _, n in names]
  ids = np.arange(math.prod(sizes))
  if m.group(2):
    dims = [int(x) for x in m.group(2).split(",")]
    ids = ids.reshape(dims)
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
  ids = ids.reshape(sizes)
  along = [i for i, (n, _) in enumerate(names) if n in
           re.findall(r"'([^']+)'", m.group(4))]
  rest = [i for i in range(len(sizes)) if i not in along]
  ids = ids.transpose(rest + along)
  return ids.reshape(-1, math.prod(sizes[i] for i in along)).tolist()


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
