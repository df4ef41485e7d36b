"""A whole sharding run: plan the tasks, run the parts (here, as local processes, or as a SLURM job
array through submitit), then check every part and publish the manifest."""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import time

import torch

from rcdm.config import ClusterConfig, path_segment
from rcdm.distributed import cpu_threads_from_slurm
from rcdm.encoders import LEVELS, encoder_spec
from rcdm.errors import UserError
from rcdm.manifest import read_manifest
from rcdm.storage import open_fs, remove_stale_temporaries
from sharding.config import ShardJob
from sharding.encode import run_part
from sharding.publish import check_compatible, finalize

log = logging.getLogger(__name__)


def _check_request(job: ShardJob) -> None:
    """Fail before any work on a request that cannot be met."""
    for name in job.encoders:
        spec = encoder_spec(name)
        have = spec.levels(job.arch)
        for level in job.levels:
            if level not in LEVELS:
                raise UserError(f"unknown level {level!r}; choose from {', '.join(LEVELS)}")
            if level not in have:
                raise UserError(f"encoder {name} has no {level} level (it has {', '.join(have)}); drop it from "
                                f"encoders or choose levels=[{','.join(have)}]")
    if job.image_format not in ("png", "jpg"):
        raise UserError(f"image_format must be png or jpg, not {job.image_format!r}")
    if job.shard_size < 1 or job.image_size < 8:
        raise UserError("shard_size must be >= 1 and image_size >= 8")
    path_segment("split", job.split)  # it names the shard files: never a path out of the output
    for key in ("max_pixels", "max_member_bytes", "batch_size", "workers"):
        if getattr(job, key) < 1:
            raise UserError(f"{key}={getattr(job, key)} must be at least 1")
    if job.loader_workers < 0 or not 0 <= job.max_rejected_fraction <= 1:
        raise UserError("loader_workers must be >= 0 and max_rejected_fraction within [0, 1]")


def _part_in_process(job: ShardJob, tasks: list[int], part: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO)
    return run_part(job, tasks, part)


def _part_in_slurm_task(job: ShardJob, tasks: list[int], part: int) -> dict:
    """A SLURM array task's entry: torch takes the task's --cpus-per-task (clusters without CPU binding would
    otherwise start one thread per core of the node in every task sharing it), then the part runs."""
    cpu_threads_from_slurm()
    return run_part(job, tasks, part)


def run_local(job: ShardJob, parts: list[list[int]]) -> list[dict]:
    if len(parts) == 1:
        return [run_part(job, parts[0], 0)]
    threads = max(1, (os.cpu_count() or 1) // len(parts))
    with cf.ProcessPoolExecutor(len(parts), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_part_in_process, job, p, i, threads) for i, p in enumerate(parts)]
        return [f.result() for f in futures]


def run_slurm(job: ShardJob, parts: list[list[int]], opts: ClusterConfig) -> list[dict]:
    import submitit

    executor = submitit.AutoExecutor(folder=opts.folder, cluster="slurm")
    params = {"timeout_min": opts.time_min, "cpus_per_task": opts.cpus_per_task, "mem_gb": opts.mem_gb,
              "slurm_array_parallelism": opts.array_parallelism, "name": "rcdm-shard", "tasks_per_node": 1,
              "nodes": 1}
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(opts, key):
            params[f"slurm_{key}"] = getattr(opts, key)
    executor.update_parameters(**params)
    jobs = executor.map_array(_part_in_slurm_task, [job] * len(parts), parts, list(range(len(parts))))
    log.info("submitted %d SLURM array tasks (job %s); waiting", len(jobs), jobs[0].job_id.split("_")[0])
    return [j.result() for j in jobs]


def shard(job: ShardJob) -> dict:
    """Run (or complete) the dataset ``job`` describes; returns a summary including the manifest."""
    t0 = time.perf_counter()
    _check_request(job)
    fs, root = open_fs(job.output, job.storage)
    check_compatible(read_manifest(job.output, job.storage), job.image_size, job.image_format, job.flip)
    remove_stale_temporaries(fs, root)
    source = job.source()
    num_tasks = len(source.tasks())
    workers = max(1, min(job.workers, num_tasks))
    parts = [list(range(p, num_tasks, workers)) for p in range(workers)]
    if job.cluster.name == "local":
        results = run_local(job, parts)
    elif job.cluster.name == "slurm":
        results = run_slurm(job, parts, job.cluster)
    else:
        raise UserError(f"unknown cluster {job.cluster.name!r}; choose local or slurm")
    manifest = finalize(job, num_tasks, source.describe())
    seconds = time.perf_counter() - t0
    done = sum(r["images"] for r in results)
    split = manifest.splits[job.split]
    return {"output": job.output, "split": job.split, "samples": split.count, "rejected": split.rejected["count"],
            "processed_now": done, "bytes_written": sum(r["bytes"] for r in results), "seconds": seconds,
            "images_per_s": done / seconds if seconds > 0 else 0.0, "manifest": manifest}
