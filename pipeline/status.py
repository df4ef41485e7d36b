"""A sweep submitted with ``cluster.wait=false``, reconciled later from SLURM's accounting and MLflow: each job's
SLURM state beside its MLflow run; a run whose job ended without ending it (killed, out of memory, node lost) is
ended FAILED; once every job has ended, the parent run is ended (FINISHED when every job completed and its run
finished, else FAILED) and the sweep report is written. Safe to run any number of times."""
from __future__ import annotations

import datetime
import shutil
import subprocess
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from rcdm.config import TrackingConfig, TrainConfig
from rcdm.errors import UserError
from rcdm.report.collect import child_runs
from rcdm.storage import open_fs, read_json, write_json

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


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """The current State of each job in SLURM's accounting (``CANCELLED by 0`` -> ``CANCELLED``)."""
    if not shutil.which("sacct"):
        raise UserError("sacct was not found: run launch/status.py where SLURM's client commands are (the login node)")
    p = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobID,State"], capture_output=True,
                       text=True, timeout=120)
    if p.returncode != 0:
        raise UserError(f"sacct failed ({p.stderr.strip()}); SLURM's accounting (slurmdbd) must be on to follow a sweep "
                        f"that was submitted without waiting")
    states = {}
    for line in p.stdout.splitlines():
        if "|" in line:
            job, state = line.split("|", 1)
            states[job] = state.split()[0] if state.strip() else "UNKNOWN"
    return states


def reconcile(cfg: TrainConfig, now: datetime.datetime | None = None) -> dict:
    """Read ``submitted.json``, compare SLURM with MLflow, end what has ended; -> the record, with ``jobs`` as
    JobState and ``ended`` set once the parent run was ended."""
    fs, path = open_fs(cfg.submitted_file, cfg.storage)
    if not fs.exists(path):
        raise UserError(f"no sweep submitted without waiting is recorded at {cfg.sweep_root}: give the overrides the "
                        f"sweep was launched with (storage, tracking, sweep_id, experiment), or launch it with "
                        f"cluster=slurm cluster.wait=false")
    record = read_json(fs, path)
    states = sacct_states([j["slurm_job_id"] for j in record["jobs"]])
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(record["parent_run_id"])
    runs = {r.data.tags.get("slurm_job_id"): r for r in child_runs(client, parent)}
    jobs = []
    for j in record["jobs"]:
        job = JobState(j["slurm_job_id"], j["overrides"], states.get(j["slurm_job_id"], "UNKNOWN"))
        run = runs.get(job.slurm_job_id)
        if run is not None:
            job.run_id, job.run_status = run.info.run_id, run.info.status
            if job.ended and job.run_status == "RUNNING":  # the job died without ending its run
                client.set_tag(job.run_id, "ended_by", f"launch/status.py: SLURM state {job.slurm}")
                client.set_terminated(job.run_id, "FAILED")
                job.run_status = "FAILED"
        jobs.append(job)
    if all(j.ended for j in jobs) and not record.get("ended"):
        status = "FINISHED" if all(j.ok for j in jobs) else "FAILED"
        client.set_terminated(parent.info.run_id, status)
        now = now or datetime.datetime.now(datetime.timezone.utc)
        record["ended"] = {"status": status, "at": now.isoformat(timespec="seconds")}
        write_json(fs, path, record)
        from pipeline.sweep import report_sweep

        report_sweep(TrackingConfig(cfg.tracking.uri, cfg.tracking.experiment), cfg.sweep_id, parent.info.run_id)
    return {**record, "jobs": jobs}


def format_status(record: dict) -> str:
    jobs: list[JobState] = record["jobs"]
    rows = [("SLURM job", "SLURM state", "MLflow run", "run status", "job")]
    rows += [(j.slurm_job_id, j.slurm, (j.run_id or "-")[:12], j.run_status or "-",
              " ".join(o for o in j.overrides if o.split("=")[0] in ("encoder", "level", "model"))) for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    done = sum(j.ended for j in jobs)
    head = f"sweep {record['sweep_id']} (submitted {record['submitted_at']}): {done}/{len(jobs)} jobs ended"
    if record.get("ended"):
        tail = f"parent MLflow run {record['parent_run_id']} ended {record['ended']['status']} at {record['ended']['at']}"
    else:
        tail = (f"parent MLflow run {record['parent_run_id']} stays RUNNING: {len(jobs) - done} jobs still pending or "
                f"running; run this again later")
    return "\n".join([head, *lines, tail])
