"""MLflow tracking through explicit run ids (no global active run): a sweep is a parent run, each job
a child run that a requeued or restarted job continues. Only rank 0 constructs a ``Tracker``."""
from __future__ import annotations

import logging
import os
import posixpath
import re
import tempfile
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from rcdm.errors import UserError
from rcdm.redaction import scrub, split_userinfo

log = logging.getLogger(__name__)
SECRET = re.compile(r"(secret|password|passwd|token|access_key|api_key|credential)", re.I)
PARENT_TAG = "mlflow.parentRunId"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def redact(params: dict[str, Any]) -> dict[str, str]:
    """Config values as MLflow params, with anything that looks like a credential hidden: keys named like
    one, URL user information and the environment's credential values (rcdm.redaction)."""
    return {k: ("***" if SECRET.search(k) and v not in (None, "") else scrub(str(v)))[:6000]
            for k, v in params.items()}


def runs_link(tracking_uri: str, experiment_id: str, run_id: str = "", artifact: str = "") -> str:
    """Where a person opens the runs table (MLflow 3 opens experiments on another tab), or one run (at
    ``artifact`` in its artifact view, when given)."""
    path = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    path += f"/artifacts/{artifact}" if artifact else ""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{scrub(tracking_uri).rstrip('/')}/{path}"
    return (f"run `mlflow ui --backend-store-uri {scrub(tracking_uri)}` here, then open "
            f"http://127.0.0.1:5000/{path}")


def check_reachable(tracking_uri: str | None, timeout_s: float = 5.0) -> None:
    """An ``mlflow server`` URI must answer its /health within ``timeout_s`` (MLflow's client would retry for
    minutes, then each job again); a UserError otherwise. Local stores (sqlite, file) need no server."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    base, _, _ = split_userinfo(tracking_uri)
    try:
        with urllib.request.urlopen(base.rstrip("/") + "/health", timeout=timeout_s) as r:  # noqa: S310 - http(s) only
            r.read(64)
    except urllib.error.HTTPError:
        return  # it answered: a server is there (authentication is the client's business)
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"the MLflow tracking server at {scrub(tracking_uri)} does not answer ({reason}); start it, "
                        f"or fix tracking.uri (tracking=local keeps runs in ./mlflow.db)") from None


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id: str | None = None
        self.resumed = False
        self._last_step = -1

    @classmethod
    def attach(cls, tracking_uri: str | None, run_id: str) -> Tracker:
        """A tracker on an existing run, to add to it (an analysis of that run's model)."""
        self = cls.__new__(cls)
        self.uri, self.client = tracking_uri, MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = self.client.get_run(run_id).info.experiment_id
        self.run_id, self.resumed, self._last_step = run_id, True, -1
        return self

    def start(self, run_id: str | None, name: str, tags: dict[str, str], params: dict[str, Any] | None = None) -> str:
        """Continue ``run_id`` if given (a requeued job), else create the run and log its params once."""
        if run_id:
            self.run_id, self.resumed = run_id, True
            self.client.update_run(run_id, status="RUNNING")
            self._last_step = self._max_logged_step()
        else:
            run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            self.run_id = run.info.run_id
            params = redact(flatten(params or {}))
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(k, scrub(str(v))) for k, v in tags.items()])
        return self.run_id

    def _max_logged_step(self) -> int:
        hist = self.client.get_metric_history(self.run_id, "loss")
        return max((m.step for m in hist), default=-1)

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int, once: bool = False) -> None:
        """Metrics at ``step``; steps a previous attempt of this job already logged are skipped, so a
        resumed run's step axis has no duplicates. ``once``: metrics of their own that a run logs a single
        time (an end-of-run evaluation at the last training step), logged whatever the step."""
        if once:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), timestamp_ms, step)
                                                        for k, v in metrics.items()])
            return
        if step <= self._last_step:
            return
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()])
        self._last_step = step

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """``data`` as the run's artifact ``artifact_file`` (``samples/step-000000050.png``, ``faithfulness.json``)."""
        folder, name = posixpath.split(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:  # MLflow's client uploads files, not bytes
            local = os.path.join(tmp, name)
            with open(local, "wb") as f:
                f.write(data)
            self.client.log_artifact(self.run_id, local, folder or None)

    def log_figure(self, figure, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact."""
        self.client.log_figure(self.run_id, figure, artifact_file)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, scrub(value))

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED (preempted, to be continued by the requeued job)."""
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    def link(self) -> str:
        return runs_link(self.uri, self.experiment_id)
