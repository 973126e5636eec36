"""A dependency-free progress bar with rate and ETA, for training, evaluation and batch inference.

On a terminal it redraws one line; in logs (not a TTY) it prints a line at most every `every_s`
seconds, so CI logs and `nohup` files stay readable. Rate and ETA follow the recent speed (exponential
moving averages of the items and the time of each update, as tqdm), not the average since the start:
when other jobs slow the machine down, or it frees up, the ETA says so within a few updates.
"""
from __future__ import annotations

import sys
import time


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


class Progress:
    """Usage: ``p = Progress(total, "train"); p.update(n, loss=1.2); p.close()``.

    smoothing: weight of the latest update in the moving averages (1: the last update alone; smaller
    values average over about 2 / smoothing updates). clock: seconds, for tests.
    """

    def __init__(self, total: int, desc: str = "", start: int = 0, every_s: float = 10.0, enabled: bool = True, stream=None,
                 smoothing: float = 0.1, clock=time.perf_counter):
        self.total, self.desc, self.n = total, desc, start
        self.every_s, self.enabled, self.smoothing, self.clock = every_s, enabled, smoothing, clock
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = self.last_update = clock()
        self.last_print = float("-inf")  # the first update prints
        self.postfix = ""
        self._avg_n = self._avg_dt = 0.0  # moving averages of items and seconds per update

    @property
    def rate(self) -> float:
        """Items per second over the recent updates."""
        return self._avg_n / self._avg_dt if self._avg_dt > 0 else 0.0

    @property
    def eta(self) -> float:
        r = self.rate
        return (self.total - self.n) / r if r > 0 else float("nan")

    def line(self) -> str:
        pct = 100.0 * self.n / max(self.total, 1)
        width = 24
        fill = int(width * self.n / max(self.total, 1))
        eta = format_seconds(self.eta) if self.rate > 0 else "?"
        elapsed = format_seconds(self.clock() - self.t0)
        return (f"{self.desc} [{'#' * fill}{'.' * (width - fill)}] {self.n}/{self.total} {pct:5.1f}% "
                f"| {self.rate:.2f} it/s | {elapsed} elapsed | ETA {eta}" + (f" | {self.postfix}" if self.postfix else ""))

    def update(self, n: int = 1, **metrics) -> None:
        now = self.clock()
        self.n += n
        a = self.smoothing if self._avg_dt > 0 else 1.0  # the first update starts the averages
        self._avg_n += a * (n - self._avg_n)
        self._avg_dt += a * (now - self.last_update - self._avg_dt)
        self.last_update = now
        if metrics:
            self.postfix = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif now - self.last_print >= self.every_s or self.n >= self.total:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last_print = now

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
