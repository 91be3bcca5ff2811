"""README sections that a command writes: the text between two markers.

A number in the README comes from a command; the command that computes a
table replaces the lines between its `<!-- name:begin -->` and
`<!-- name:end -->` markers, and a test compares them with its output.
"""
from __future__ import annotations

from bitnet_jax.errors import InputError


def replace_section(path: str, begin: str, end: str, text: str) -> None:
  """Write `text` between the markers `begin` and `end` of the file."""
  with open(path) as f:
    content = f.read()
  if begin not in content or end not in content:
    raise InputError(f"{path} has no {begin} ... {end} section")
  head, rest = content.split(begin, 1)
  _, tail = rest.split(end, 1)
  with open(path, "w") as f:
    f.write(f"{head}{begin}\n{text}{end}{tail}")
