"""``hydra/launcher=rcdm_local`` (configs/cluster/local.yaml): the local sweep's launcher. It runs the jobs one
after another in this process, exactly as Hydra's basic launcher does, or side by side, each in a process of its
own with its share of the cores' torch threads, where pipeline/local_jobs.py says that trains faster (the tiny
demo model on CPUs) or ``cluster.jobs_at_once`` asks for it.

Side by side keeps what one process guaranteed:
- each job runs as a Hydra job (its folder, saved configs with credentials masked, its callbacks), returning a
  JobReturn in job order, so a job that raises fails the sweep after the others ran, as the basic launcher does;
- a job that exits (a one-line ``error:`` and exit 2) stops the sweep: no further job starts, the running ones end
  on their own, then the launcher exits with that status (its parent run ends FAILED, as in one process);
- a process that dies without a result (killed, out of memory) is a failed job saying so;
- when the launcher is stopped (SIGTERM, Ctrl-C), each running job gets the preemption signal (SIGUSR2): it
  checkpoints at the end of its step and ends its run KILLED, so the same command resumes it exactly.
No ``from __future__ import annotations`` here (see __init__.py)."""

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)
STOP_GRACE_S = 300  # how long stopped jobs may take to checkpoint before they are killed


@dataclass
class LocalConf:
    _target_: str = "hydra_plugins.rcdm_launcher.local.LocalLauncher"
    jobs_at_once: int = 0  # 0: chosen by pipeline/local_jobs.py; 1: one after another in this process


ConfigStore.instance().store(group="hydra/launcher", name="rcdm_local", node=LocalConf, provider="rcdm")


def _run_here(job: str, result: str) -> None:
    """In the job's own process: run the Hydra job in the file ``job`` as the basic launcher would, and leave its
    outcome in ``result`` (both in the launcher's private folder): ("returned", JobReturn), ("exit", status) or
    ("raised", a masked error)."""
    import cloudpickle

    with open(job, "rb") as f:
        hydra_context, task_function, config, overrides, idx, state, threads = cloudpickle.loads(f.read())
    if threads:
        import torch

        torch.set_num_threads(threads)
    Singleton.set_state(state)
    setup_globals()
    try:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):  # the job's number and id, as the basic launcher sets them
            OmegaConf.update(sweep_config, "hydra.job.id", idx)
            OmegaConf.update(sweep_config, "hydra.job.num", idx)
        outcome = ("returned", run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
    except SystemExit as e:  # the job's one-line error was printed; its status says the rest
        outcome = ("exit", e.code if isinstance(e.code, int) else 1)
    except BaseException as e:  # noqa: BLE001 - Ctrl-C or a failure outside the job: brought back masked
        from pipeline.guard import masked_error

        outcome = ("raised", masked_error(e))
    tmp = f"{result}.tmp"
    with open(tmp, "wb") as f:
        f.write(cloudpickle.dumps(outcome))
    os.replace(tmp, result)


class LocalLauncher(Launcher):
    def __init__(self, jobs_at_once: int = 0) -> None:
        self.jobs_at_once = jobs_at_once
        self.config: Optional[DictConfig] = None
        self.hydra_context: Any = None
        self.task_function: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from pipeline.local_jobs import available_bytes, cores, local_plan

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        plan = local_plan(len(job_overrides), int(self.jobs_at_once), self._tiny_on_cpu(job_overrides), cores(),
                          available_bytes())
        log.info("Launching %d jobs locally: %s", len(job_overrides), plan.why)
        if plan.at_once <= 1:
            from hydra._internal.core_plugins.basic_launcher import BasicLauncher

            basic = BasicLauncher()
            basic.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
            return basic.launch(job_overrides, initial_job_idx)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="rcdm-jobs-")  # private (0700): the jobs' outcomes
        try:
            return self._side_by_side(job_overrides, initial_job_idx, plan.at_once, plan.threads, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

    def _tiny_on_cpu(self, job_overrides: Sequence[Sequence[str]]) -> bool:
        """Every job trains the tiny model on the CPU (its composed config says so)."""
        from pipeline.stages import train_config
        from rcdm.cost import runs_on_cpu

        for overrides in job_overrides:
            cfg = train_config(self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides)))
            if cfg.model.name != "tiny" or not runs_on_cpu(cfg):
                return False
        return True

    def _side_by_side(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, at_once: int,
                      threads: int, folder: str) -> List[JobReturn]:
        import cloudpickle

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per job: its own torch threads, no fork
        pending = list(enumerate(job_overrides, start=initial_job_idx))
        running: Dict[int, tuple] = {}  # sentinel -> (idx, overrides, process, result path)
        returns: Dict[int, JobReturn] = {}
        exit_status: Optional[int] = None
        try:
            while pending or running:
                while pending and exit_status is None and len(running) < at_once:
                    idx, overrides = pending.pop(0)
                    log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
                    job, result = os.path.join(folder, f"{idx}.job"), os.path.join(folder, f"{idx}.outcome")
                    with open(job, "wb") as f:  # a file, not the start pipe: starting never waits on the child
                        f.write(cloudpickle.dumps((self.hydra_context, self.task_function, self.config,
                                                   list(overrides), idx, Singleton.get_state(), threads)))
                    proc = ctx.Process(target=_run_here, args=(job, result), name=f"rcdm-job-{idx}")
                    proc.start()
                    running[proc.sentinel] = (idx, list(overrides), proc, result)
                if not running:
                    break
                for sentinel in wait(list(running)):
                    idx, overrides, proc, result = running.pop(sentinel)
                    proc.join()
                    kind, value = _outcome(result, proc.exitcode)
                    if kind == "returned":
                        returns[idx] = value
                    elif kind == "exit":
                        exit_status = value if exit_status is None else exit_status
                    else:
                        returns[idx] = _failed(overrides, value)
        finally:
            if running:  # the launcher itself is stopping: let each job checkpoint, then go
                _stop([entry[2] for entry in running.values()])
        if exit_status is not None:
            if pending:
                print(f"the sweep stopped at a failed job: {len(pending)} job(s) not started", file=sys.stderr,
                      flush=True)
            raise SystemExit(exit_status)
        return [returns[i] for i in sorted(returns)]


def _outcome(result: str, exitcode: Optional[int]) -> tuple:
    import cloudpickle

    if os.path.exists(result):
        with open(result, "rb") as f:
            return cloudpickle.loads(f.read())
    how = f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"status {exitcode}"
    from pipeline.guard import JobFailed

    hint = " (killed: out of memory?)" if exitcode == -signal.SIGKILL else ""
    return "died", JobFailed(f"the job's process ended with {how} before its job returned{hint}")


def _failed(overrides: List[str], error: BaseException) -> JobReturn:
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    ret.return_value = error
    return ret


def _stop(procs: list) -> None:
    """Send each job the preemption signal, wait for them to checkpoint and end, kill what is left."""
    from rcdm.train import PREEMPT_SIGNAL

    for p in procs:
        if p.is_alive():
            os.kill(p.pid, PREEMPT_SIGNAL)
    print(f"stopping: {len(procs)} running job(s) told to checkpoint and end (signal {int(PREEMPT_SIGNAL)}); the same "
          f"command resumes them", file=sys.stderr, flush=True)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
