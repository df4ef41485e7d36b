"""Read a sweep out of MLflow: its parent run, every child run with its metrics, loss history, last sample
grid and end-of-run JSON, and the jobs the sweep asked for that have no finished run (and why).

Everything comes through the MLflow client, so any tracking URI works (a local store, an `mlflow server`,
artifacts on S3 behind either); nothing is read from the run folders.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.entities import Run
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from rcdm.errors import UserError
from rcdm.stats import mapping
from rcdm.tracking import PARENT_TAG

END_JSON = ("faithfulness", "factor_reads", "conditioning", "invariance", "fidelity", "timing")
READERS = 8  # runs read at once
GRID_NAME = re.compile(r"^step-\d{9}\.png$")
PICTURED = 8  # encoders whose sample grids, bars and loss curves the page draws; its tables hold every run


@dataclass
class JobRun:
    """One child run, as the report needs it."""

    run: Run
    loss: list[tuple[int, float]] = field(default_factory=list)
    grid: bytes | None = None  # the last sample grid (PNG)
    grid_step: int | None = None
    end: dict[str, object] = field(default_factory=dict)  # faithfulness.json, ... that the run logged, typed
    pictured: bool = True  # its grid and loss history were read (the first PICTURED encoders of a sweep)
    unread: list[str] = field(default_factory=list)  # artifacts listed but not readable (a run still writing them)

    @property
    def tags(self) -> dict[str, str]:
        return self.run.data.tags

    @property
    def params(self) -> dict[str, str]:
        return self.run.data.params

    @property
    def metrics(self) -> dict[str, float]:
        return self.run.data.metrics

    @property
    def encoder(self) -> str:
        return self.tags.get("encoder", "?")

    @property
    def level(self) -> str:
        return self.tags.get("level", "?")

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.run.info.run_id

    @property
    def status(self) -> str:
        return self.run.info.status

    def problem(self) -> str | None:
        """Why this run is not a finished result, or None when it is."""
        status, last = self.status, self.loss[-1][0] if self.loss else None
        total = self.params.get("train.steps", "?")
        at = f"at step {last} of {total}" if last is not None else "before its first logged step"
        if status == "FINISHED":
            return None
        if status == "FAILED":
            return f"FAILED {at}: {self.tags.get('error', 'no error recorded; see the job log')}"
        if status == "KILLED":
            return f"KILLED (preempted) {at}: a requeued or restarted job continues it"
        return f"{status} {at} (the job is still going, or died without ending its run)"


@dataclass
class Sweep:
    parent: Run
    experiment: str
    tracking_uri: str
    overrides: list[str]
    runs: list[JobRun]
    missing: list[tuple[dict[str, str], str]]  # (the job's sweep choices, why it has no run)

    @property
    def encoders(self) -> list[str]:
        return sorted({r.encoder for r in self.runs})

    @property
    def pictured(self) -> list[JobRun]:
        return [r for r in self.runs if r.pictured]


def find_parent(client: MlflowClient, experiment: str, sweep_id: str, run_id: str | None = None) -> Run:
    """The sweep's parent run: ``run_id``, else the newest run tagged kind=sweep with this sweep_id."""
    if run_id:
        return client.get_run(run_id)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise UserError(f"no MLflow experiment {experiment!r} at this tracking URI (experiments: {names}); "
                        f"set tracking.experiment=<the sweep's experiment>")
    runs = client.search_runs([exp.experiment_id], f"tags.kind = 'sweep' and tags.sweep_id = '{sweep_id}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise UserError(f"experiment {experiment!r} has no sweep with sweep_id={sweep_id!r}; set sweep_id=<the "
                        f"sweep's id> (or run_id=<its parent MLflow run>)")
    return runs[0]


def recorded_overrides(param: str) -> list[str]:
    """The sweep's command-line overrides as its parent run records them: a JSON list (a value may hold a space,
    ``data.url='/data/my set'``); parents from before that recorded them joined by spaces."""
    if param.startswith("["):
        try:
            value = json.loads(param)
            if isinstance(value, list) and all(isinstance(o, str) for o in value):
                return value
        except ValueError:
            pass
    return [o for o in param.split() if o]


def expected_jobs(overrides: list[str]) -> list[dict[str, str]] | None:
    """The jobs a multirun's overrides ask for, each as {key: choice} over the swept keys; None where the recorded
    overrides do not parse (the report then lists no missing jobs, and says so)."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - Hydra's parser raises its own kinds; the report goes on without this list
        return None
    swept = [(o.get_key_element(), [str(v) for v in o.sweep_iterator()]) for o in parsed if o.is_sweep_override()]
    return [dict(zip([k for k, _ in swept], combo)) for combo in itertools.product(*[v for _, v in swept])]


def _matches(run: JobRun, job: dict[str, str]) -> bool:
    """A group choice (``encoder=dino``) is the param ``encoder.name``; any other key is its own param."""
    return all(run.params.get(k, run.params.get(f"{k}.name")) == v for k, v in job.items())


def _download(repo, job: JobRun, path: str, scratch: Path) -> bytes | None:
    """An artifact's bytes, or None (noted on the job) when it cannot be read: a run that is still going, or was
    killed, may list an artifact whose upload never completed. One retry: a running upload may finish. Read
    through the run's artifact repository, from the artifact URI the search returned: the client's own download
    looks the run up again first, twice the round trips on a sweep of a thousand runs."""
    for attempt in range(2):
        try:
            return Path(repo.download_artifacts(path, str(scratch))).read_bytes()
        except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; the report goes on without this file
            if attempt:
                job.unread.append(f"{path} ({type(e).__name__})")
            else:
                time.sleep(1.0)
    return None


def _read_run(client: MlflowClient, run: Run, scratch: Path, pictured: bool) -> JobRun:
    """A child's end-of-run files; its loss history and newest grid where it is pictured (a run that did not
    finish always has its history read: the page says at which step it stopped)."""
    job = JobRun(run, pictured=pictured)
    rid, repo = run.info.run_id, get_artifact_repository(run.info.artifact_uri, tracking_uri=client.tracking_uri)
    scratch.mkdir(parents=True, exist_ok=True)
    if pictured or run.info.status != "FINISHED":
        job.loss = sorted((m.step, m.value) for m in client.get_metric_history(rid, "loss"))
    names = {Path(a.path).name: a for a in repo.list_artifacts()}
    if pictured and "samples" in names and names["samples"].is_dir:
        grids = sorted(f"samples/{Path(a.path).name}" for a in repo.list_artifacts("samples")
                       if GRID_NAME.match(Path(a.path).name))  # step-<9 digits>.png, as rcdm logs them
        for path in reversed(grids):  # the newest grid that can be read
            job.grid = _download(repo, job, path, scratch)
            if job.grid is not None:
                job.grid_step = int(Path(path).stem.split("-")[-1])
                break
    for key in END_JSON:
        if f"{key}.json" in names:
            data = _download(repo, job, f"{key}.json", scratch)
            if data is None:
                continue
            try:
                job.end[key] = read_end_json(key, json.loads(data))
            except ValueError as e:  # one malformed artifact costs its own cells, never the report
                job.unread.append(f"{key}.json ({str(e)[:160]})")
    return job


def read_end_json(key: str, d):
    """An end-of-run JSON a run logged, as the typed record of the room that writes it (rcdm.analysis.faithfulness,
    factor_reads, invariance, fidelity; rcdm.evaluation's timing), which checks the fields the page and figures read
    (their types and finite numbers): an artifact is anyone's word who may log to the run, so a malformed one
    raises ValueError naming the field, and the page escapes every string it shows. Others: the JSON object."""
    from rcdm.analysis.factor_reads import FactorReads
    from rcdm.analysis.faithfulness import Faithfulness
    from rcdm.analysis.fidelity import Fidelity
    from rcdm.analysis.invariance import Invariance
    from rcdm.evaluation import Timing

    records = {"faithfulness": Faithfulness, "factor_reads": FactorReads, "invariance": Invariance,
               "fidelity": Fidelity, "timing": Timing}
    return records[key].of(d) if key in records else mapping(d, key)


def _read_runs(client: MlflowClient, children: list[Run], scratch: Path, pictured: int) -> list[JobRun]:
    """Every child read, ``READERS`` at once: one run's reads are a handful of small requests, so many runs read
    together keep the server busy. One at a time where no thread can start: the report a crashed sweep writes from
    its exit hook runs after Python has stopped new threads."""
    shown = set(sorted({r.data.tags.get("encoder", "?") for r in children})[:pictured])

    def read(run: Run) -> JobRun:
        return _read_run(client, run, scratch / run.info.run_id, run.data.tags.get("encoder", "?") in shown)
    try:
        with ThreadPoolExecutor(READERS) as pool:
            futures = [pool.submit(read, r) for r in children]
    except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
        return [read(r) for r in children]
    return [f.result() for f in futures]


def child_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """Every child run of ``parent``, oldest first, page by page (a search returns at most 1000 runs at a time)."""
    runs, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def collect(tracking_uri: str, experiment: str, sweep_id: str, run_id: str | None = None,
            pictured: int = PICTURED) -> Sweep:
    """The sweep as the report needs it; every run's end-of-run files, and the grids and loss histories of the
    first ``pictured`` encoders' runs."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per artifact otherwise
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = find_parent(client, experiment, sweep_id, run_id)
    children = child_runs(client, parent)
    with tempfile.TemporaryDirectory() as tmp:
        runs = _read_runs(client, children, Path(tmp), pictured)
    runs.sort(key=lambda j: (j.encoder, j.level, j.name))
    overrides = recorded_overrides(parent.data.params.get("sweep.overrides", ""))
    missing, jobs = [], expected_jobs(overrides)
    for job in jobs or []:
        if not any(_matches(r, job) for r in runs):
            missing.append((job, "no MLflow run: not started yet, or the job failed before training began "
                                 "(see the launcher's output, or the job's SLURM log)"))
    if jobs is None:
        missing.append(({}, "the sweep's recorded overrides do not parse, so the jobs it asked for are unknown: the "
                            "tables hold the runs that exist"))
    exp = client.get_experiment(parent.info.experiment_id)
    return Sweep(parent, exp.name, tracking_uri, overrides, runs, missing)
