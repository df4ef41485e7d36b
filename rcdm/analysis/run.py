"""The analysis commands behind ``launch/analyze.py``: each writes ``<output>/<analysis>.png`` and
``<output>/<analysis>.json``, and logs both to an MLflow run when given one."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rcdm.analysis import explore
from rcdm.analysis.faithfulness import faithfulness
from rcdm.device import pick_device
from rcdm.errors import UserError
from rcdm.preprocess import find_images
from rcdm.sampling import draw, encode_images, grid_png, load_with_encoder

log = logging.getLogger(__name__)
ANALYSES = ("interpolate", "variability", "faithfulness")


@dataclass
class AnalyzeConfig:
    analysis: str
    checkpoint: str
    images: str | list[str]
    output: str = "analysis"
    steps: str = "ddim25"
    sampler: str | None = None  # None: ddim for "ddimN" steps, else ddpm
    seed: int = 0
    device: str = "auto"
    download: bool = True
    endpoint_url: str | None = None
    batch_size: int = 64
    # interpolate
    points: int = 8
    rows: int = 3
    mode: str = "linear"  # linear | spherical
    # variability
    samples: int = 8
    # faithfulness
    boot: int = 1000
    # MLflow: log the figure and numbers to this run
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None


def run_analysis(cfg: AnalyzeConfig) -> dict:
    if cfg.analysis not in ANALYSES:
        raise UserError(f"unknown analysis {cfg.analysis!r}; choose one of {', '.join(ANALYSES)}")
    sampler = cfg.sampler or ("ddim" if str(cfg.steps).startswith("ddim") else "ddpm")
    device = pick_device(cfg.device)
    paths = find_images(cfg.images)
    loaded, encoder = load_with_encoder(cfg.checkpoint, device, cfg.download, cfg.endpoint_url)
    h, originals = encode_images(paths, encoder, encoder.preprocess, loaded.level, loaded.model.cfg.image_size, device)
    model, sched, n_steps = loaded.model, loaded.schedule, loaded.num_steps
    t0 = time.perf_counter()
    if cfg.analysis == "interpolate":
        if len(paths) != 2:
            raise UserError(f"interpolate takes exactly 2 images, got {len(paths)}: images=[a.png,b.png]")
        grid, numbers = explore.interpolate(model, encoder, loaded.level, sched, n_steps, h[0], h[1], cfg.points,
                                            cfg.rows, cfg.mode, str(cfg.steps), sampler, cfg.seed)
        png = explore.interpolation_png(originals[0], originals[1], grid)
        scalars = {"interpolate_monotone_fraction": numbers["monotone_fraction"]}
    else:
        if len(paths) < 2:
            raise UserError(f"{cfg.analysis} needs at least 2 images, got {len(paths)}")
        per_image = cfg.samples if cfg.analysis == "variability" else 1
        if per_image < 2 and cfg.analysis == "variability":
            raise UserError("variability needs samples >= 2")
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        samples = draw(model, sched, n_steps, h.repeat_interleave(per_image, 0), str(cfg.steps), sampler,
                       cfg.batch_size, gen)
        if cfg.analysis == "variability":
            v = explore.variability(samples.view(len(paths), per_image, *samples.shape[1:]).cpu())
            png = explore.variability_png(originals, samples.view(len(paths), per_image, *samples.shape[1:]),
                                          v["within"])
            numbers = {k: v[k] for k in ("ratio", "ratio_mean", "within_mean", "between_mean")}
            numbers["samples_per_image"] = per_image
            scalars = {"variability_ratio_mean": numbers["ratio_mean"]}
        else:
            numbers = faithfulness(h, samples, encoder, loaded.level, boot=cfg.boot, seed=cfg.seed)
            png = grid_png(originals, samples)
            scalars = {f"faithfulness_{k}": numbers[k] for k in ("mrr", "top1", "mean_rank", "median_rank")}
    numbers.update(analysis=cfg.analysis, checkpoint=cfg.checkpoint, encoder=loaded.encoder, level=loaded.level,
                   images=[str(p) for p in paths], steps=str(cfg.steps), sampler=sampler, seed=cfg.seed,
                   seconds=time.perf_counter() - t0)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    png_path, json_path = out / f"{cfg.analysis}.png", out / f"{cfg.analysis}.json"
    png_path.write_bytes(png)
    json_path.write_text(json.dumps(numbers, indent=2))
    if cfg.mlflow_run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(cfg.tracking_uri)
        for p in (png_path, json_path):
            client.log_artifact(cfg.mlflow_run_id, str(p), "analysis")
        for k, v in scalars.items():
            client.log_metric(cfg.mlflow_run_id, k, v)
    log.info("%s: %s and %s (%s)", cfg.analysis, png_path, json_path, scalars)
    return {"png": str(png_path), "json": str(json_path), **scalars}
