"""A sweep submitted with ``cluster.wait=false``, reconciled later from SLURM's accounting and MLflow: each job's
SLURM state beside its MLflow run; a run whose job ended without ending it (killed, out of memory, node lost) is
ended FAILED; once every job has ended, the parent run is ended (FINISHED when every job completed and its run
finished, else FAILED) and the sweep report is written. Safe to run any number of times."""
from __future__ import annotations

import datetime
import re
import shutil
import subprocess
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from pipeline.submitted import Submitted, read_submitted, write_submitted
from rcdm.config import TrackingConfig, TrainConfig
from rcdm.errors import UserError
from rcdm.redaction import printable
from rcdm.report.collect import child_runs
from rcdm.storage import recorded_run_id
from rcdm.tracking import check_reachable

# sacct's states after which a job never runs again (a requeued job's current record is PENDING or RUNNING)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "REVOKED"}


@dataclass
class JobState:
    slurm_job_id: str
    overrides: list[str]
    slurm: str  # sacct's State ("UNKNOWN" while the accounting has no record yet)
    run_id: str | None = None
    run_status: str | None = None

    @property
    def ended(self) -> bool:
        return self.slurm in ENDED

    @property
    def ok(self) -> bool:
        return self.slurm == "COMPLETED" and self.run_status == "FINISHED"


SACCT_BATCH = 1000  # job ids per sacct call: thousands in one argument list overflow it


def _array_tasks(job: str) -> list[str]:
    """``7_[1-3,5%2]`` (the pending tasks of an array, one accounting record) -> ``7_1 7_2 7_3 7_5``; else [job]."""
    m = re.fullmatch(r"(\d+)_\[([\d,:\-]+)(?:%\d+)?\]", job)
    if not m:
        return [job]
    tasks = []
    for part in m.group(2).split(","):
        lo, _, rest = part.partition("-")
        hi, _, step = rest.partition(":")
        tasks += range(int(lo), int(hi or lo) + 1, int(step or 1))
    return [f"{m.group(1)}_{t}" for t in tasks]


def _queued(job_ids: list[str]) -> set[str]:
    """The jobs the controller still holds (pending, running, or ended within MinJobAge), arrays one task a line."""
    held = set()
    for i in range(0, len(job_ids) if shutil.which("squeue") else 0, SACCT_BATCH):
        p = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids[i:i + SACCT_BATCH]), "-o", "%i|%T"],
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:  # the controller did not answer: nothing is concluded from its silence
            return set(job_ids)
        held |= {line.split("|", 1)[0] for line in p.stdout.splitlines() if "|" in line}
    return held


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """The current State of each job in SLURM's accounting (``CANCELLED by 0`` -> ``CANCELLED``). An array task
    cancelled while still pending leaves no record of its own (measured, slurm-wlm 22-24): it is reported CANCELLED
    once its array is in the accounting, the array's pending record no longer lists it and the controller's
    queue does not hold it."""
    if not shutil.which("sacct"):
        raise UserError("sacct was not found: run launch/status.py where SLURM's client commands are (the login node)")
    states = {}
    ids = list(dict.fromkeys(job_ids))
    arrays = {i.split("_")[0] for i in ids if "_" in i}
    asked = ids + sorted(arrays - set(ids))  # the array itself: its pending tasks are one record, 7_[1-3]
    for i in range(0, len(asked), SACCT_BATCH):
        p = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(asked[i:i + SACCT_BATCH]), "-o", "JobID,State"],
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise UserError(f"sacct failed ({printable(p.stderr.strip())[:300]}); SLURM's accounting (slurmdbd) "
                            f"must be on to follow a sweep that was submitted without waiting")
        for line in p.stdout.splitlines():
            if "|" in line:
                job, state = line.split("|", 1)
                state = state.split()[0] if state.strip() else "UNKNOWN"
                for task in _array_tasks(job):
                    # a task's own record wins: the pending record lags a task that has started (seen: 5_1
                    # RUNNING beside 5_[1,3%1] PENDING)
                    if task == job or task not in states:
                        states[task] = state
    known = {j.split("_")[0] for j in states}
    gone = [i for i in ids if i not in states and "_" in i and i.split("_")[0] in known]
    queued = _queued(gone)
    for i in gone:
        if i not in queued:
            states[i] = "CANCELLED"
    return {i: states[i] for i in ids if i in states}


def _own_parent(cfg: TrainConfig, client: MlflowClient, record: Submitted):
    """The parent MLflow run ``record`` names, once it is shown to be this sweep's: the run ``parent_run.json``
    records, tagged as the sweep with this sweep_id, in this experiment. Anything else is refused: a record in a
    shared folder must not end (or write a report into) another sweep's run."""
    own = recorded_run_id(cfg.parent_run_file, cfg.storage)
    refuse = (f"{cfg.submitted_file} names parent run {record.parent_run_id}, which is not this sweep's parent run "
              f"({own or 'none recorded in parent_run.json'})")
    if record.parent_run_id is None or record.parent_run_id != own:
        raise UserError(f"{refuse}; nothing was ended: check that these are the overrides the sweep was launched with")
    run = client.get_run(own)
    exp = client.get_experiment(run.info.experiment_id)
    tags = run.data.tags
    if tags.get("kind") != "sweep" or tags.get("sweep_id") != cfg.sweep_id or exp.name != cfg.tracking.experiment:
        raise UserError(f"MLflow run {own} is not the parent run of sweep {cfg.sweep_id} in experiment "
                        f"{cfg.tracking.experiment} (its tags: kind {tags.get('kind')}, sweep_id "
                        f"{tags.get('sweep_id')}; experiment {exp.name}); nothing was ended")
    return run


def reconcile(cfg: TrainConfig, now: datetime.datetime | None = None) -> dict:
    """Read ``submitted.json``, compare SLURM with MLflow, end what has ended; -> the record as a dict, with
    ``jobs`` as JobState and ``ended`` set once the parent run was ended."""
    record = read_submitted(cfg.submitted_file, cfg.storage)
    if record is None:
        raise UserError(f"no sweep submitted without waiting is recorded at {cfg.sweep_root}: give the overrides the "
                        f"sweep was launched with (storage, tracking, sweep_id, experiment), or launch it with "
                        f"cluster=slurm cluster.wait=false")
    if not record.jobs:
        raise UserError(f"{cfg.submitted_file} records no submitted job; nothing to follow (launch the sweep again "
                        f"with cluster.wait=false)")
    check_reachable(cfg.tracking.uri)  # one line, not minutes of retries and a traceback
    client = MlflowClient(cfg.tracking.uri)
    parent = _own_parent(cfg, client, record)
    states = sacct_states([j.slurm_job_id for j in record.jobs])
    runs = {r.data.tags.get("slurm_job_id"): r for r in child_runs(client, parent)}  # this parent's children only
    jobs = []
    for j in record.jobs:
        job = JobState(j.slurm_job_id, list(j.overrides), states.get(j.slurm_job_id, "UNKNOWN"))
        run = runs.get(job.slurm_job_id)
        if run is not None:
            job.run_id, job.run_status = run.info.run_id, run.info.status
            if job.ended and job.run_status == "RUNNING":  # the job died without ending its run
                client.set_tag(job.run_id, "ended_by", f"launch/status.py: SLURM state {job.slurm}")
                client.set_terminated(job.run_id, "FAILED")
                job.run_status = "FAILED"
        jobs.append(job)
    if all(j.ended for j in jobs) and not record.ended:
        # a job submitted twice (a relaunch) counts as done when one of its submissions completed
        by_job: dict[tuple, bool] = {}
        for j in jobs:
            by_job[tuple(j.overrides)] = by_job.get(tuple(j.overrides), False) or j.ok
        status = "FINISHED" if all(by_job.values()) else "FAILED"
        fresh = read_submitted(cfg.submitted_file, cfg.storage)  # a relaunch may have added jobs meanwhile
        if fresh is None or fresh.jobs != record.jobs or fresh.ended:
            return {**record.to_dict(), "jobs": jobs, "changed": True}
        client.set_terminated(parent.info.run_id, status)
        now = now or datetime.datetime.now(datetime.timezone.utc)
        record.ended = {"status": status, "at": now.isoformat(timespec="seconds")}
        write_submitted(cfg.submitted_file, record, cfg.storage)
        from pipeline.stages import report_sweep

        report_sweep(TrackingConfig(cfg.tracking.uri, cfg.tracking.experiment), cfg.sweep_id, parent.info.run_id)
    return {**record.to_dict(), "jobs": jobs}


def format_status(record: dict) -> str:
    """What status prints; every text that came from a file or from SLURM is made printable (no terminal escapes)."""
    jobs: list[JobState] = record["jobs"]
    rows = [("SLURM job", "SLURM state", "MLflow run", "run status", "job")]
    rows += [(j.slurm_job_id, printable(j.slurm), (j.run_id or "-")[:12], j.run_status or "-",
              printable(" ".join(o for o in j.overrides if o.split("=")[0] in ("encoder", "level", "model"))))
             for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    done = sum(j.ended for j in jobs)
    head = (f"sweep {printable(record['sweep_id'])} (submitted {printable(record['submitted_at'])}): "
            f"{done}/{len(jobs)} jobs ended")
    unknown = [j.slurm_job_id for j in jobs if j.slurm == "UNKNOWN"]
    if unknown:
        lines.append(f"{len(unknown)} job(s) unknown to SLURM's accounting ({', '.join(unknown[:5])}"
                     f"{', ...' if len(unknown) > 5 else ''}): a job just submitted appears within seconds; one the "
                     f"accounting has purged never will, and the sweep cannot end here until it does: check it with "
                     f"sacct -j <id> and end the MLflow runs by hand")
    if record.get("changed"):
        tail = ("the record changed while this ran (a relaunch submitted more jobs): nothing was ended; run this "
                "again")
    elif record.get("ended"):
        tail = f"parent MLflow run {record['parent_run_id']} ended {record['ended']['status']} at {record['ended']['at']}"
    else:
        tail = (f"parent MLflow run {record['parent_run_id']} stays RUNNING: {len(jobs) - done} jobs still pending or "
                f"running; run this again later")
    return "\n".join([head, *lines, tail])
