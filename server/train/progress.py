"""A one-line progress bar with the running loss, on stderr.

On a terminal the line is redrawn in place (carriage return); into a file or pipe it prints a line
at every tenth of the run instead, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import TextIO

_WIDTH = 24
_RUNNING = 10  # steps in the running loss


class Progress:
    def __init__(self, total_steps: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = enabled and self.stream.isatty()
        self.recent: deque[float] = deque(maxlen=_RUNNING)
        self.start = time.perf_counter()
        self.last_milestone = -1
        self.width = 0  # of the line on screen, to blank out leftovers of a longer one

    def update(self, step: int, epoch: int, loss: float) -> None:
        """After optimizer step `step` (1-based) of epoch `epoch` (1-based)."""
        self.recent.append(loss)
        if not self.enabled:
            return
        milestone = step * 10 // self.total
        if not self.interactive and milestone == self.last_milestone and step != self.total:
            return
        self.last_milestone = milestone
        filled = step * _WIDTH // self.total
        bar = "#" * filled + "." * (_WIDTH - filled)
        elapsed = time.perf_counter() - self.start
        line = (
            f"train [{bar}] {step}/{self.total} epoch {epoch} "
            f"loss {sum(self.recent) / len(self.recent):.4f} {step / max(elapsed, 1e-9):.1f} steps/s"
        )
        if self.interactive:
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
