"""``submitted.json``: the record of a sweep submitted with ``cluster.wait=false``, in the sweep's run root. Written
by the SLURM launcher (hydra_plugins/rcdm_launcher) after each submission, read by ``launch/status.py``; read and
written here only.

A run root may be shared, so the record is anyone's word who can write there: it is checked whole when read
(one error line naming the field), and status trusts it for nothing it can check elsewhere (the parent run it
names must be the one ``parent_run.json`` records and an MLflow run of this sweep)."""
from __future__ import annotations

import datetime
import logging
import re
from dataclasses import asdict, dataclass, field

from rcdm.errors import UserError
from rcdm.storage import StorageOptions, open_fs, read_json, write_json

log = logging.getLogger(__name__)
SLURM_ID = re.compile(r"^\d{1,12}(_\d{1,9})?$")  # a job, or an array task <job>_<task>
RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class SubmittedJob:
    slurm_job_id: str
    overrides: tuple[str, ...]  # the job's overrides, credentials masked: which job it is
    submitted_at: str = ""


@dataclass
class Submitted:
    sweep_id: str
    parent_run_id: str | None
    submitted_at: str  # the newest submission
    jobs: list[SubmittedJob] = field(default_factory=list)  # every submission, oldest first; none is ever dropped
    ended: dict | None = None  # {"status", "at"} once launch/status.py ended the parent run

    def to_dict(self) -> dict:
        return {"sweep_id": self.sweep_id, "parent_run_id": self.parent_run_id, "submitted_at": self.submitted_at,
                "ended": self.ended, "jobs": [{**asdict(j), "overrides": list(j.overrides)} for j in self.jobs]}

    @classmethod
    def from_dict(cls, d, where: str) -> Submitted:
        def bad(what: str) -> UserError:
            return UserError(f"{where} is not a submission record ({what}); it was altered or damaged: restore it, or "
                             f"delete it and follow the jobs with squeue/sacct")
        if not isinstance(d, dict):
            raise bad("not a JSON object")
        if not isinstance(d.get("sweep_id"), str):
            raise bad("sweep_id is not a name")
        parent = d.get("parent_run_id")
        if parent is not None and not (isinstance(parent, str) and RUN_ID.match(parent)):
            raise bad("parent_run_id is not an MLflow run id")
        if not isinstance(d.get("jobs"), list):
            raise bad("jobs is not a list")
        jobs = []
        for i, j in enumerate(d["jobs"]):
            if not (isinstance(j, dict) and isinstance(j.get("slurm_job_id"), str)
                    and SLURM_ID.match(j["slurm_job_id"])):
                raise bad(f"jobs[{i}].slurm_job_id is not a SLURM job id")
            if not (isinstance(j.get("overrides"), list) and all(isinstance(o, str) for o in j["overrides"])):
                raise bad(f"jobs[{i}].overrides is not a list of overrides")
            at = j.get("submitted_at", d.get("submitted_at", ""))
            jobs.append(SubmittedJob(j["slurm_job_id"], tuple(j["overrides"]), at if isinstance(at, str) else ""))
        ended = d.get("ended")
        if ended is not None and not (isinstance(ended, dict) and isinstance(ended.get("status"), str)):
            raise bad("ended is not {status, at}")
        at = d.get("submitted_at")
        return cls(d["sweep_id"], parent, at if isinstance(at, str) else "", jobs, ended)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_submitted(url: str, storage: StorageOptions | None = None) -> Submitted | None:
    """The record at ``url``, checked; None where there is none."""
    fs, path = open_fs(url, storage)
    if not fs.exists(path):
        return None
    try:
        d = read_json(fs, path)
    except (ValueError, UnicodeDecodeError):
        d = None
    return Submitted.from_dict(d, url)


def write_submitted(url: str, record: Submitted, storage: StorageOptions | None = None) -> None:
    fs, path = open_fs(url, storage)
    write_json(fs, path, record.to_dict())


def record_submission(url: str, sweep_id: str, parent_run_id: str | None, jobs: list[SubmittedJob],
                      storage: StorageOptions | None = None) -> Submitted:
    """Add ``jobs`` (just submitted) to the record at ``url``. Earlier submissions stay, whichever jobs they were:
    a second submission of a job that still trains must not hide the first from status. The jobs are on the
    cluster already, so they are recorded whatever the old file holds: an unreadable one is kept aside under
    ``submitted.json.unreadable-<time>`` and named in a warning."""
    try:
        record = read_submitted(url, storage)
    except UserError as e:
        fs, path = open_fs(url, storage)
        aside = f"{path}.unreadable-{now().replace(':', '')}"
        fs.mv(path, aside)
        log.warning("%s; kept it as %s and started a new record with the jobs just submitted", e, aside)
        record = None
    record = record or Submitted(sweep_id, parent_run_id, now())
    record.jobs += jobs
    record.sweep_id, record.parent_run_id, record.submitted_at, record.ended = sweep_id, parent_run_id, now(), None
    write_submitted(url, record, storage)
    return record
