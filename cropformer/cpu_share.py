"""Sharing the CPU with other processes: how much of it they use, and torch's thread count to match.

torch starts one thread per core and keeps that count. When another process keeps a core busy, the thread
on that core waits for it at every barrier of every op: beside one busy process on 2 cores a demo training
iteration ran at 25-33% of torch's idle speed with torch's settings, 52-62% with passive waiting
(`cropformer.cli.configure_cpu_runtime` chooses that at start), 67-71% with one thread (docs/BENCHMARKS.md,
seventh session). `ThreadShare` gives torch the cores the others leave free, measured while training
runs, so the choice follows other processes that start or stop later, which a setting made once at start
cannot. No torch import here: the command-line layer reads this module before torch loads.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable

logger = logging.getLogger(__name__)


def cpu_times(cpus: set[int], stat_path: str = "/proc/stat") -> tuple[int, int]:
    """(busy, total) clock ticks since boot, summed over `cpus`; busy counts steal (the host's use)."""
    busy = total = 0
    with open(stat_path) as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def allowed_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        return set(range(os.cpu_count() or 1))


class ThreadShare:
    """Keeps torch's CPU thread count at the number of cores other processes leave free.

    Use it as `with ThreadShare(...) as share:` around a loop and call `share.update()` once per step
    (cheap: it reads /proc/stat at most every `every_s` seconds); leaving the block calls `restore()`, also
    when the loop raises (a library caller's process goes on). Others' use over the last interval is the
    cores' busy time minus this process's own CPU time (all its threads); torch gets round(cores - others)
    threads, between 1 and the count it started with. Nothing
    happens where /proc/stat is missing (macOS, Windows) or when the user fixed the count
    (OMP_NUM_THREADS / MKL_NUM_THREADS set); `enabled` says whether it adapts.

    Args:
        active: False makes every call a no-op (GPU runs, several ranks), so callers need no branches.
        max_threads: the most threads to use (default: torch's count now).
        every_s: seconds between measurements; the first one ends at the first `update()` at least
            `first_s` (1 s: a hundred /proc/stat ticks per core) after construction.
        set_threads, own_cpu_s, clock, stat_path: injectable for tests (torch.set_num_threads,
            time.process_time, time.monotonic, "/proc/stat").
    """

    def __init__(self, max_threads: int | None = None, every_s: float = 10.0, first_s: float = 1.0, *,
                 active: bool = True, set_threads: Callable[[int], None] | None = None,
                 own_cpu_s: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic,
                 stat_path: str = "/proc/stat"):
        if not active:
            self.enabled, self.threads = False, None
            return
        if set_threads is None or max_threads is None:
            import torch

            set_threads = set_threads or torch.set_num_threads
            max_threads = max_threads or torch.get_num_threads()
        self.max_threads = self.threads = max(1, max_threads)
        self.first_s, self._measured = first_s, False
        self.every_s, self._set_threads, self._own, self._clock, self._stat = every_s, set_threads, own_cpu_s, clock, stat_path
        self.cpus = allowed_cpus()
        self._ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        user_fixed = any(os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
        self._last = None if user_fixed else self._sample()
        self.enabled = self._last is not None

    def _sample(self) -> tuple[float, int, int, float] | None:
        try:
            busy, total = cpu_times(self.cpus, self._stat)
        except (OSError, ValueError):
            return None
        return self._clock(), busy, total, self._own()

    def others(self, before, after) -> float | None:
        """Cores' worth of CPU others used between two samples, None if the interval is empty."""
        d_busy, d_total = after[1] - before[1], after[2] - before[2]
        if d_total <= 0:
            return None
        wall_s = d_total / self._ticks_per_s / len(self.cpus)  # ticks of every core tick at once
        ours = (after[3] - before[3]) / wall_s  # cores' worth this process used
        return max(0.0, d_busy / d_total * len(self.cpus) - ours)

    def update(self) -> int:
        """Re-measure when due; returns torch's thread count (changed if the free cores changed)."""
        if not self.enabled or self._clock() - self._last[0] < (self.every_s if self._measured else self.first_s):
            return self.threads
        now = self._sample()
        if now is None:
            self.enabled = False
            return self.threads
        others = self.others(self._last, now)
        self._last, self._measured = now, True
        if others is None:
            return self.threads
        want = min(self.max_threads, max(1, math.floor(len(self.cpus) - others + 0.5)))
        if want != self.threads:
            self._set_threads(want)
            logger.info("other processes use %.1f of %d cores: %d CPU threads (was %d)", others, len(self.cpus),
                        want, self.threads)
            self.threads = want
        return self.threads

    def __enter__(self) -> "ThreadShare":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Give torch back the thread count it started with (a library caller's process goes on after)."""
        if self.enabled and self.threads != self.max_threads:
            self._set_threads(self.max_threads)
            self.threads = self.max_threads
