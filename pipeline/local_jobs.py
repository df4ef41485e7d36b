"""How a local sweep shares this machine: how many jobs train at once, and with how many torch threads each.

Measured on a 2-core AMD EPYC (benchmarks/side_by_side.py, benchmarks/results/side_by_side.json): two demo jobs
side by side with one torch thread each train 1.19x the images per second of one job on both threads, because
the tiny UNet's step does not spread over cores as well as two steps do. So where every job of the sweep is the
tiny demo model on the CPU, the sweep runs one job per core (up to the memory); anything else (a GPU, a larger
model, whose side-by-side rate nobody measured) runs one job after another in the launching process, as
Hydra's basic launcher does. ``cluster.jobs_at_once`` overrides the choice either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# One demo job's resident memory, with room: the whole 8-job sweep peaked at 1.62 GB in one process (dataset,
# encoder-free training of the tiny UNet, the end-of-run analyses); a job in a process of its own holds less.
JOB_BYTES = 2 << 30


@dataclass(frozen=True)
class LocalPlan:
    at_once: int  # jobs running at the same time (1: one after another, in the launching process)
    threads: int  # torch threads per job when side by side (0: torch's own default)
    why: str  # one line for the log


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cores() -> int:
    """The cores this process may run on (the affinity mask: a container or taskset may give fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_plan(jobs: int, requested: int, tiny_on_cpu: bool, ncores: int, free: int | None) -> LocalPlan:
    """``jobs``: the sweep's job count; ``requested``: ``cluster.jobs_at_once`` (0 = choose); ``tiny_on_cpu``:
    every job trains the tiny model on the CPU; ``ncores``: usable cores; ``free``: available memory in bytes."""
    if requested < 0:
        from rcdm.errors import UserError

        raise UserError(f"cluster.jobs_at_once={requested} must be 0 (chosen here), 1 (one after another) or more")
    if jobs <= 1 or requested == 1:
        return LocalPlan(1, 0, "one job at a time in this process" + (
            " (cluster.jobs_at_once=1)" if requested == 1 and jobs > 1 else ""))
    if requested > 1:
        n = min(requested, jobs)
        return LocalPlan(n, max(1, ncores // n), f"{n} jobs at once, {max(1, ncores // n)} torch thread(s) each "
                                                 f"(cluster.jobs_at_once={requested})")
    if not tiny_on_cpu:
        return LocalPlan(1, 0, "one job at a time in this process (side by side is chosen only for the tiny model "
                               "on CPUs, where it was measured; cluster.jobs_at_once=N asks for it)")
    by_memory = max(1, free // JOB_BYTES) if free is not None else ncores
    n = min(jobs, ncores, by_memory)
    if n <= 1:
        why = "one core" if ncores <= 1 else f"{(free or 0) / 2**30:.1f} GiB available, {JOB_BYTES / 2**30:.0f} per job"
        return LocalPlan(1, 0, f"one job at a time in this process ({why})")
    return LocalPlan(n, max(1, ncores // n), f"{n} jobs at once, {max(1, ncores // n)} torch thread(s) each, on "
                                             f"{ncores} cores (side by side trains more images per second than one "
                                             f"job on every core; cluster.jobs_at_once=1 runs them one after another)")
