"""``hydra/launcher=rcdm_slurm`` (configs/cluster/slurm.yaml): hydra-submitit-launcher's SLURM launcher with
one option added. ``cluster.wait=false`` submits every job, records the submission beside the sweep's parent
run (``submitted.json`` in the sweep's run root: SLURM job ids, each job's overrides, the parent MLflow run) and
returns, so the sweep outlives the login shell; ``launch/status.py`` reconciles it later. With ``wait`` (the
default) it is the plugin's launcher unchanged.

It lives in ``hydra_plugins``, the one package Hydra takes launchers from, which loads it without registering
the module first: no ``from __future__ import annotations`` here (dataclasses would not find the module)."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

@dataclass
class WaitOrNotConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.rcdm_launcher.SlurmLauncher"
    wait: bool = True  # false: submit, record the jobs, return


log = logging.getLogger(__name__)
ConfigStore.instance().store(group="hydra/launcher", name="rcdm_slurm", node=WaitOrNotConf, provider="rcdm")


class _Submitted:
    """A submitted job standing in for submitit's Job in the launcher's result list: its result is the job id
    at once, instead of waiting for the job to end."""

    def __init__(self, job, overrides: Sequence[str]):
        self.job, self.overrides = job, list(overrides)

    def results(self) -> list[JobReturn]:
        ret = JobReturn(overrides=self.overrides, status=JobStatus.COMPLETED)
        ret.return_value = {"slurm_job_id": self.job.job_id}
        return [ret]


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def __init__(self, wait: bool = True, **params: Any) -> None:
        super().__init__(**params)
        self.wait = wait

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if self.wait:
            return super().launch(job_overrides, initial_job_idx)
        submitted = self._submit(job_overrides, initial_job_idx)
        self._record(submitted)
        return [s.results()[0] for s in submitted]

    def _submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> List[_Submitted]:
        """Submit every job as the plugin's launch does (the same executor, parameters and per-job arguments, so a
        job runs exactly as under ``wait``), without waiting for any: the executor is this launcher's own, no
        class of submitit's is touched."""
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        cluster, params = self._EXECUTOR, dict(self.params)
        init = {f"{cluster}_max_num_timeout": params.pop("max_num_timeout")} if "max_num_timeout" in params else {}
        executor = submitit.AutoExecutor(cluster=cluster, folder=params.pop("submitit_folder"), **init)
        generic = set(OmegaConf.structured(BaseQueueConf).keys())  # the rest are the cluster's own, prefixed
        executor.update_parameters(**{k if k in generic else f"{cluster}_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, int(str(self.config.hydra.sweep.mode), 8))
        args = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*args))
        return [_Submitted(job, overrides) for job, overrides in zip(jobs, job_overrides)]

    def _record(self, submitted: list[_Submitted]) -> None:
        """Add the jobs just submitted to ``submitted.json`` in the sweep's run root (pipeline/submitted.py): earlier
        submissions stay recorded, so status follows every job that may still run."""
        from pipeline.submitted import SubmittedJob, now, record_submission
        from pipeline.stages import train_config
        from rcdm.errors import UserError
        from rcdm.redaction import scrub
        from rcdm.storage import recorded_run_id

        cfg = train_config(self.config)
        at = now()
        jobs = [SubmittedJob(s.job.job_id, tuple(scrub(o) for o in s.overrides), at) for s in submitted]
        try:
            parent = recorded_run_id(cfg.parent_run_file, cfg.storage)
        except UserError as e:  # the jobs are submitted: record them whatever else is wrong
            log.warning("%s; the submission is recorded without its parent run", e)
            parent = None
        record_submission(cfg.submitted_file, cfg.sweep_id, parent, jobs, cfg.storage)
