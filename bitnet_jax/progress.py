"""Progress of a long loop on the console: a log line at most every
`every_s` seconds with the count done, the rate and the time left (ETA);
silent for loops that end sooner."""
from __future__ import annotations

import logging
import time


class Progress:
  """progress = Progress(total, "windows"); progress.advance(n) per step."""

  def __init__(self, total: int, unit: str, what: str = "",
               every_s: float = 10.0, clock=time.monotonic):
    self.total, self.unit, self.what = total, unit, what
    self.every_s, self.clock = every_s, clock
    self.done = 0
    self.start = self.last = clock()

  def advance(self, n: int = 1) -> str | None:
    """Count n more; returns the line it logged, if it logged one."""
    self.done += n
    now = self.clock()
    if now - self.last < self.every_s or self.done >= self.total:
      return None
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    left = (self.total - self.done) / rate if rate else float("inf")
    line = (f"{self.what + ': ' if self.what else ''}{self.done:,} / "
            f"{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%), "
            f"{rate:,.1f} {self.unit}/s, ETA {format_seconds(left)}")
    logging.info("%s", line)
    return line


def format_seconds(s: float) -> str:
  if s != s or s == float("inf"):
    return "?"
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (
      f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")
