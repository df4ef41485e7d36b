"""``launch/analyze.py``'s glue: its typed config (the common keys, then one section of options per analysis,
made from ``rcdm.analysis.ANALYSES``), and ``run_analysis``: load the model and its encoder, read the images,
run the analysis, write ``<output>/<analysis>.png`` and ``.json`` and, given an MLflow run, log them there."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from rcdm.analysis import ANALYSES
from rcdm.analysis.base import Inputs, Result
from rcdm.device import pick_device
from rcdm.errors import UserError
from rcdm.sampling import Sampling, load_with_encoder
from rcdm.storage import write_local

log = logging.getLogger(__name__)

COMMON = [  # (key, type, default): what every analysis takes
    ("analysis", str, "???"),
    ("checkpoint", Any, "???"),  # a file or run root, demo:<name>, a released name; invariance: one per level
    ("images", Any, "???"),  # files, a folder, or "synthetic:N" (the demo's generator, factors known)
    ("output", str, "analysis"),
    ("steps", str, "ddim25"),
    ("sampler", Optional[str], None),  # None: ddim for "ddimN" steps, else ddpm
    ("guidance", float, 1.0),  # classifier-free guidance scale (recorded with every number); 1 = plain conditional
    ("seed", int, 0),
    ("batch_size", int, 64),
    ("device", str, "auto"),
    ("download", bool, True),
    ("allow_url", Optional[str], None),  # fetch encoder weights the checkpoint records at this URL (else refused)
    ("endpoint_url", Optional[str], None),  # S3-compatible endpoint for s3:// checkpoints
    ("mlflow_run_id", Optional[str], None),  # log the figures, numbers and headline metrics to this run
    ("tracking_uri", Optional[str], None),
]
AnalyzeConfig = make_dataclass("AnalyzeConfig", [
    *[(k, t, field(default=d)) for k, t, d in COMMON],
    *[(name, m.Options, field(default_factory=m.Options)) for name, m in ANALYSES.items()],
])
AnalyzeConfig.__module__ = __name__
AnalyzeConfig.__doc__ = ("launch/analyze.py's config: the common keys, and ``<analysis>.<option>`` for each analysis "
                         "of rcdm.analysis.ANALYSES (e.g. interpolate.points=12).")


def inputs_for(cfg, device: torch.device) -> Inputs:
    """The model(s), encoder and images ``cfg`` names, as an analysis takes them."""
    checkpoints = [cfg.checkpoint] if isinstance(cfg.checkpoint, str) else list(cfg.checkpoint)
    if len(checkpoints) > 1 and cfg.analysis != "invariance":
        raise UserError(f"{cfg.analysis} takes one checkpoint, got {len(checkpoints)}")
    loaded, encoder = load_with_encoder(checkpoints[0], device, cfg.download, cfg.endpoint_url, cfg.allow_url)
    others = [load_with_encoder(p, device, cfg.download, cfg.endpoint_url, cfg.allow_url) for p in checkpoints[1:]]
    return Inputs.of_images(loaded, encoder, cfg.images,
                            Sampling(str(cfg.steps), cfg.sampler, cfg.guidance, cfg.seed, cfg.batch_size), device,
                            others, cfg.download)


def run_analysis(cfg) -> dict:
    if cfg.analysis not in ANALYSES:
        raise UserError(f"unknown analysis {cfg.analysis!r}; choose one of {', '.join(ANALYSES)}")
    device = pick_device(cfg.device)
    inputs = inputs_for(cfg, device)
    t0 = time.perf_counter()
    result: Result = ANALYSES[cfg.analysis].run(inputs, getattr(cfg, cfg.analysis))
    n = len(inputs.names)
    result.numbers.update(analysis=cfg.analysis, checkpoint=cfg.checkpoint, encoder=inputs.loaded.card.encoder.name,
                          level=inputs.level, images=inputs.names if n <= 256 else f"{n} images",
                          **inputs.sampling.describe(), seconds=time.perf_counter() - t0)
    written = write_result(Path(cfg.output), cfg.analysis, result)
    if cfg.mlflow_run_id:
        from rcdm.tracking import Tracker

        tracker = Tracker.attach(cfg.tracking_uri, cfg.mlflow_run_id)
        for p in written:
            tracker.log_artifact(str(p), "analysis")
        tracker.log_metrics(result.metrics, 0, int(time.time() * 1000), once=True)
    log.info("%s: %s (%s)", cfg.analysis, ", ".join(map(str, written)), result.metrics)
    pngs = [p for p in written if p.suffix == ".png"]
    return {"png": str(pngs[0]) if pngs else None, "pngs": [str(p) for p in pngs], "json": str(written[-1]),
            **result.metrics}


def write_result(out: Path, name: str, result: Result) -> list[Path]:
    """``<out>/<name><suffix>.png`` for each figure, then ``<out>/<name>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, data in result.figures.items():
        written.append(out / f"{name}{suffix}.png")
        write_local(written[-1], data)
    written.append(out / f"{name}.json")
    write_local(written[-1], json.dumps(result.numbers, indent=2, default=str))
    return written
