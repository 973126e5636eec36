"""`ThreadShare` (cropformer/cpu_share.py): torch's CPU threads follow the cores other processes leave free,
during training. Driven by a fake /proc/stat and clock, and once against a real busy process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cropformer.cpu_share import ThreadShare, allowed_cpus


class FakeMachine:
    """/proc/stat of `allowed_cpus()` cores, a clock and this process's CPU time, advanced by hand."""

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self, path):
        self.path, self.cpus = path, sorted(allowed_cpus())
        self.now = self.own = 0.0
        self.busy = {c: 0 for c in self.cpus}
        self.idle = {c: 0 for c in self.cpus}
        self.threads = []  # every thread count set
        self.write()

    def write(self):
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"cpu{c} {self.busy[c]} 0 0 {self.idle[c]} 0 0 0 0 0 0" for c in self.cpus]
        self.path.write_text("\n".join(lines) + "\nintr 1\n")

    def run(self, seconds: float, ours: float, others: float):
        """`seconds` pass with `ours` and `others` cores' worth busy (spread over the cores)."""
        n = len(self.cpus)
        for c in self.cpus:
            busy = min(1.0, (ours + others) / n)
            self.busy[c] += round(busy * seconds * self.HZ)
            self.idle[c] += round((1 - busy) * seconds * self.HZ)
        self.now += seconds
        self.own += ours * seconds
        self.write()

    def share(self, max_threads: int, **kw) -> ThreadShare:
        return ThreadShare(max_threads, set_threads=self.threads.append, own_cpu_s=lambda: self.own,
                           clock=lambda: self.now, stat_path=str(self.path), **kw)


@pytest.fixture
def machine(tmp_path, monkeypatch):
    if len(allowed_cpus()) < 2:
        pytest.skip("needs 2 cores to share")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    return FakeMachine(tmp_path / "stat")


def test_threads_follow_the_free_cores(machine):
    n = len(machine.cpus)
    share = machine.share(n, every_s=10.0)
    assert share.enabled and share.update() == n and machine.threads == []  # nothing measured yet
    machine.run(2.0, ours=n - 1.0, others=1.0)  # another process took a core
    assert share.update() == n - 1 and machine.threads == [n - 1]
    machine.run(5.0, ours=n - 1.0, others=1.0)
    assert share.update() == n - 1 and machine.threads == [n - 1]  # not due yet (every 10 s)
    machine.run(6.0, ours=n - 1.0, others=0.0)  # it stopped
    assert share.update() == n and machine.threads == [n - 1, n]
    machine.run(11.0, ours=n, others=0.3)  # a little background work keeps every thread
    assert share.update() == n and machine.threads == [n - 1, n]
    machine.run(11.0, ours=n - 1.0, others=1.0)
    assert share.update() == n - 1
    share.restore()  # the end of the loop: torch's own count again
    assert share.threads == n and machine.threads == [n - 1, n, n - 1, n]
    share.restore()
    assert machine.threads == [n - 1, n, n - 1, n]  # nothing to give back twice


def test_leaving_the_block_gives_the_threads_back_also_on_errors(machine):
    n = len(machine.cpus)
    with pytest.raises(RuntimeError, match="step failed"):
        with machine.share(n, first_s=0.5) as share:
            machine.run(1.0, ours=n - 1.0, others=1.0)
            assert share.update() == n - 1
            raise RuntimeError("step failed")
    assert machine.threads == [n - 1, n]


def test_never_below_one_nor_above_the_start(machine):
    share = machine.share(1, first_s=0.5)
    machine.run(1.0, ours=0.0, others=float(len(machine.cpus)))  # every core taken by others
    assert share.update() == 1 and machine.threads == []
    share = machine.share(2, first_s=0.5)
    machine.run(1.0, ours=1.0, others=0.0)  # more cores free than threads allowed
    assert share.update() == min(2, len(machine.cpus))


def test_a_thread_count_the_user_set_is_kept(machine, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    share = machine.share(2, first_s=0.0)
    machine.run(2.0, ours=0.0, others=float(len(machine.cpus)))
    assert not share.enabled and share.update() == 2 and machine.threads == []


def test_no_proc_stat_means_no_change(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = ThreadShare(2, set_threads=lambda n: pytest.fail("changed"), stat_path=str(tmp_path / "missing"))
    assert not share.enabled and share.update() == 2
    share = ThreadShare(active=False, set_threads=lambda n: pytest.fail("changed"))  # GPU runs, several ranks
    share.update()
    share.restore()
    assert not share.enabled


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(allowed_cpus()) < 2, reason="Linux, 2 cores")
def test_training_gives_a_busy_core_back(tmp_path):
    """A real busy process beside `train` on CPU: the iterations after the first measurement run with one
    thread fewer (metrics.jsonl records the count); the first ones with torch's, and so does the process
    after `train` returns."""
    from tests.conftest import tiny_train_overrides

    script = f"""
import sys, json
from pathlib import Path
from cropformer.config import load_config
from cropformer.data.synthetic import make_synthetic_dataset
from cropformer.engine import train
root = Path({str(tmp_path)!r})
make_synthetic_dataset(root / "train", 4, (96, 128), seed=0)
cfg = load_config("tiny", {tiny_train_overrides(tmp_path, tmp_path / "out", "solver.max_iter=12", "solver.checkpoint_period=100")!r})
train(cfg, device="cpu")
import torch
print(torch.get_num_threads())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        run = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True,
                             timeout=600)
    finally:
        hog.kill()
        hog.wait()
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    threads = [r["threads"] for r in records]
    cores = len(allowed_cpus())
    assert threads[0] == cores and threads[-1] == cores - 1, threads
    assert int(run.stdout.split()[-1]) == cores  # given back when training returns
