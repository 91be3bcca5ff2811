"""Progress of a long loop on the console: a log line at most every
`every_s` seconds with the count done, the rate and the time left (ETA);
silent for loops that end sooner."""
from __future__ import annotations

import logging
import time


EVERY_S = 10.0  # seconds between two lines


class Progress:
  """progress = Progress(total, "windows"); progress.advance(n) per step.
  A total of None (an iterator of unknown length) logs count and rate only."""

  def __init__(self, total: int | None, unit: str, what: str = "",
               every_s: float | None = None, clock=time.monotonic):
    self.total, self.unit, self.what = total, unit, what
    self.every_s = EVERY_S if every_s is None else every_s
    self.clock = clock
    self.done = 0
    self.start = self.last = clock()

  def advance(self, n: int = 1) -> str | None:
    """Count n more; returns the line it logged, if it logged one."""
    self.done += n
    now = self.clock()
    if now - self.last < self.every_s or (
        self.total is not None and self.done >= self.total):
      return None
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    what = f"{self.what}: " if self.what else ""
    if self.total is None:
      line = f"{what}{self.done:,} {self.unit}, {rate:,.1f} {self.unit}/s"
    else:
      left = (self.total - self.done) / rate if rate else float("inf")
      line = (f"{what}{self.done:,} / {self.total:,} {self.unit} "
              f"({100 * self.done / self.total:.0f}%), {rate:,.1f} "
              f"{self.unit}/s, ETA {format_seconds(left)}")
    logging.info("%s", line)
    return line


def format_seconds(s: float) -> str:
  if s != s or s == float("inf"):
    return "?"
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (
      f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")
