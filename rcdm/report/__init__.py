"""The sweep report: a finished (or unfinished) sweep's comparison of encoders and levels as one page,
``report.html`` beside its figures, written locally and logged to the sweep's parent MLflow run.

    python launch/report.py                                  # the default sweep (sqlite:///mlflow.db)
    python launch/report.py tracking=server tracking.experiment=rcdm-imagenet sweep_id=main
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mlflow.tracking import MlflowClient

from rcdm.config import TrackingConfig
from rcdm.report.collect import PICTURED, Sweep, collect
from rcdm.report.figures import figures
from rcdm.report.page import render
from rcdm.storage import write_local
from rcdm.tracking import runs_link

log = logging.getLogger(__name__)
ARTIFACT_DIR = "report"


@dataclass
class ReportConfig:
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep_id: str = "main"
    run_id: Optional[str] = None  # the sweep's parent MLflow run; null = the newest with this sweep_id
    output: Optional[str] = None  # local folder for report.html and its figures; null = reports/<tracking.experiment>/<sweep_id>
    log_to_mlflow: bool = True  # also log them as artifacts of the parent run (under report/)
    pictured: int = PICTURED  # encoders drawn (grids, bars, loss curves), the first in name order; tables hold all


def write_report(cfg: ReportConfig) -> dict:
    """Collect the sweep from MLflow, write the page and figures to ``cfg.output``, log them to the parent
    run. -> {"html": local path, "link": where to open it, "sweep": Sweep}."""
    sweep: Sweep = collect(cfg.tracking.uri, cfg.tracking.experiment, cfg.sweep_id, cfg.run_id, cfg.pictured)
    parent = sweep.parent.info
    link = runs_link(cfg.tracking.uri, parent.experiment_id, parent.run_id, f"{ARTIFACT_DIR}/report.html")
    figs = figures(sweep.pictured)
    out = Path(cfg.output or f"reports/{cfg.tracking.experiment}/{cfg.sweep_id}")
    out.mkdir(parents=True, exist_ok=True)
    for name, png in figs.items():
        write_local(out / name, png)
    html = out / "report.html"
    write_local(html, render(sweep, figs, link))  # a half-written page never replaces a good one
    if cfg.log_to_mlflow:
        client = MlflowClient(tracking_uri=cfg.tracking.uri)
        for name in ["report.html", *figs]:
            client.log_artifact(parent.run_id, str(out / name), ARTIFACT_DIR)
    return {"html": str(html), "link": link, "sweep": sweep}
