"""torch.distributed from the environment a job runs in: submitit/SLURM, torchrun, or none.

Under SLURM (through submitit) the master is the job's first node and the port is derived from the
job id, so every task of a job computes the same address with no coordination. NCCL on GPUs, gloo
on CPU; the device follows the local rank.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _export_from_slurm() -> None:
    """Set MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the SLURM job through submitit."""
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def cpu_threads_from_slurm() -> int | None:
    """Torch's CPU threads limited to the task's ``--cpus-per-task`` under SLURM, unless OMP_NUM_THREADS says
    otherwise. Torch starts one thread per core of the node; a cluster without CPU binding (TaskPlugin=task/none)
    runs several tasks per node, and their threads, oversubscribed, stall each other and the gloo collectives.
    Returns the number set, or None."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if "SLURM_JOB_ID" not in os.environ or not cpus or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = max(1, int(cpus))
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)
        log.info("torch uses %d CPU thread(s): the task's SLURM_CPUS_PER_TASK", threads)
        return threads
    return None


def init(device_pref: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the job's process group if it has more than one task; pick this rank's device."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        _export_from_slurm()
    cpu_threads_from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if use_cuda else None)
        log.info("rank %d/%d joined %s at %s:%s", rank, world, backend, os.environ.get("MASTER_ADDR"),
                 os.environ.get("MASTER_PORT"))
    return DistInfo(rank, world, local_rank, device)


def any_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any rank (so all ranks stop at the same step)."""
    if info.world == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
