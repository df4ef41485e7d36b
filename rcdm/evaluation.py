"""Evaluation of a training job's EMA model, kept out of the training loop: sample grids on fixed held-out
images during training, and at the end the RCDM faithfulness protocol. Rank 0 only; the loop makes one
call, ``Evaluator.evaluate(ema, step, final)``.
"""
from __future__ import annotations

import json
import logging
import time

import torch

from rcdm.analysis.faithfulness import faithfulness, flat_metrics
from rcdm.config import TrainConfig
from rcdm.data import DatasetInfo, heldout
from rcdm.diffusion.schedules import sampler_for
from rcdm.encoders import build_recorded_encoder
from rcdm.errors import UserError
from rcdm.grids import grid_png
from rcdm.preprocess import Preprocess
from rcdm.sampling import draw
from rcdm.storage import atomic_open, join, open_fs, write_json
from rcdm.tracking import Tracker

log = logging.getLogger(__name__)


class Evaluator:
    def __init__(self, cfg: TrainConfig, info: DatasetInfo, tracker: Tracker, device: torch.device):
        self.cfg, self.tracker, self.device = cfg, tracker, device
        split = cfg.data.heldout_split
        if split not in info.manifest.splits:
            log.warning("dataset has no %s split: grids and faithfulness condition on the first training images",
                        split)
            split = info.split
        self.held = info.with_split(split)
        self._grid = None  # (images, embeddings, keys), read on first use

    def evaluate(self, ema: torch.nn.Module, step: int, final: bool) -> dict:
        """What is due at ``step``: a grid every ``train.sample_every`` steps and at the last one; at the last
        one (``final``) also faithfulness. Returns the metrics it logged."""
        if step % self.cfg.train.sample_every == 0 or final:
            self.grid(ema, step)
        if final and self.cfg.faithfulness.images:
            return self.faithfulness(ema, step)
        return {}

    def _draw(self, ema, h: torch.Tensor, steps: str, seed: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return draw(ema, self.cfg.diffusion.schedule, self.cfg.diffusion.steps, h.to(self.device), steps,
                    sampler_for(steps), 64, gen)

    def grid(self, ema, step: int) -> None:
        """Each held-out image beside its samples; the same noise at every step, so grids compare."""
        if self._grid is None:
            self._grid = heldout(self.held, self.cfg.grid.images, self.cfg.storage)
        x, h, _ = self._grid
        samples = self._draw(ema, h.repeat_interleave(self.cfg.grid.samples, 0), self.cfg.grid.steps,
                             self.cfg.train.seed)
        png = grid_png(x, samples)
        name = f"step-{step:09d}.png"
        fs, root = open_fs(self.cfg.run_root, self.cfg.storage)
        with atomic_open(fs, join(root, "samples", name)) as f:
            f.write(png)
        self.tracker.log_bytes(png, f"samples/{name}")

    def faithfulness(self, ema, step: int) -> dict:
        """The RCDM faithfulness protocol on the first held-out embeddings, from the EMA model: scalars as
        metrics at the final step, the full result with per-image ranks as ``faithfulness.json``."""
        cfg, rec = self.cfg, self.held.encoder_record
        try:
            encoder = build_recorded_encoder(cfg.encoder.name, rec.arch, rec.weights)
        except UserError as e:  # the model is trained; a missing encoder file must not fail the job
            log.warning("faithfulness skipped: %s", e)
            self.tracker.set_tag("faithfulness", f"skipped: {e}")
            return {}
        encoder.preprocess = Preprocess.from_dict(rec.preprocess)
        encoder.to(self.device)
        _, h, keys = heldout(self.held, cfg.faithfulness.images, cfg.storage)
        if len(keys) < 2:
            self.tracker.set_tag("faithfulness", f"skipped: split {self.held.split} has fewer than 2 images")
            return {}
        t0 = time.perf_counter()
        samples = self._draw(ema, h, cfg.faithfulness.steps, cfg.train.seed + 1)
        result = faithfulness(h, samples, encoder, cfg.level.name)
        result.update(split=self.held.split, keys=keys, steps=cfg.faithfulness.steps,
                      seconds=time.perf_counter() - t0, model_step=step)
        flat = flat_metrics(result)
        self.tracker.log_metrics(flat, step, int(time.time() * 1000), once=True)  # the loss already logged this step
        fs, root = open_fs(cfg.run_root, cfg.storage)
        write_json(fs, join(root, "faithfulness.json"), result)
        self.tracker.log_bytes(json.dumps(result, indent=2).encode(), "faithfulness.json")
        log.info("faithfulness on %d held-out images (%s): MRR %.3f [%.3f, %.3f], top-1 %.3f, mean rank %.2f "
                 "(chance MRR %.3f)", result["n"], cfg.faithfulness.steps, result["mrr"], *result["mrr_ci95"],
                 result["top1"], result["mean_rank"], result["chance"]["mrr"])
        return flat
