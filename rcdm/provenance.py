"""Which code made a thing: recorded in every dataset manifest and on every MLflow run (tag ``code_version``),
so a sweep report can say whether its runs share one version."""
from __future__ import annotations

import functools
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import rcdm

REPO = Path(rcdm.__file__).resolve().parents[1]


@dataclass
class Spent:
    """What training has cost: wall seconds, and the training process's CPU seconds (all its threads; data-loader
    worker processes not counted), which other work on the machine disturbs far less than wall time. ``cpu_s`` is
    None for a run resumed from a checkpoint made before CPU seconds were recorded."""

    wall_s: float = 0.0
    cpu_s: float | None = 0.0

    @classmethod
    def of(cls, state: dict | None) -> Spent:
        """From a checkpoint (checkpoints before CPU seconds were recorded: None for them)."""
        return cls(state.get("train_seconds", 0.0), state.get("train_cpu_seconds")) if state else cls()

    @staticmethod
    def clock() -> tuple[float, float]:
        """Now on both clocks: (wall, this process's CPU)."""
        return time.perf_counter(), time.process_time()

    def since(self, clock: tuple[float, float]) -> Spent:
        """This, plus what both clocks have counted since ``clock`` was read."""
        wall, cpu = Spent.clock()
        return Spent(self.wall_s + wall - clock[0], None if self.cpu_s is None else self.cpu_s + cpu - clock[1])

    def add_since(self, clock: tuple[float, float]) -> None:
        now = self.since(clock)
        self.wall_s, self.cpu_s = now.wall_s, now.cpu_s


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``rcdm <version> (<git commit>)``, with ``+dirty`` when tracked files differ from the commit, for a
    source checkout; ``rcdm <version>`` for an installed wheel or where git is missing."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return f"rcdm {rcdm.__version__}"
    return f"rcdm {rcdm.__version__} ({commit}{'+dirty' if dirty else ''})"


@functools.lru_cache(maxsize=1)  # a record per checkpoint: read /proc/cpuinfo once
def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` shows it (from /proc/cpuinfo), or the platform's processor string."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device=None) -> dict:
    """What a timing was measured on: CPU model and cores, torch threads, the GPU when ``device`` is one, the
    platform and torch, and the 1-minute load average at the time (above the thread count: other work shared
    the cores, so the timing is an upper bound)."""
    import os
    import platform

    import torch

    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "platform": platform.platform(), "torch": torch.__version__}
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        out["load_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return out
