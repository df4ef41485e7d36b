"""Evaluation of a training job's EMA model, kept out of the training loop: the conditioning diagnostic at
every logging step, sample grids on fixed held-out images during training, and at the end the RCDM
faithfulness protocol. Rank 0 only; the loop calls ``Evaluator.diagnose`` with its logged metrics and
``Evaluator.evaluate`` after every step.
"""
from __future__ import annotations

import json
import logging
import time

import torch

from rcdm.analysis import fidelity, invariance
from rcdm.analysis.faithfulness import faithfulness, flat_metrics
from rcdm.config import TrainConfig
from rcdm.data import DatasetInfo, heldout
from rcdm.device import autocast
from rcdm.diffusion.schedules import sampler_for
from rcdm.encoders import build_recorded_encoder
from rcdm.errors import UserError
from rcdm.grids import grid_png
from rcdm.preprocess import Preprocess
from rcdm.sampling import draw
from rcdm.storage import atomic_open, join, open_fs, write_json
from rcdm.tracking import Tracker

log = logging.getLogger(__name__)
QUARTILES = 4


@torch.no_grad()
def conditioning_gains(model, diffusion, x0: torch.Tensor, h: torch.Tensor, seed: int = 0, null: bool = False,
                       chunk: int = 64) -> dict[str, float]:
    """How much the model uses its embedding at each noise level.

    For held-out images x0 [N, 3, S, S] with embeddings h [N, D], each image at one t drawn (seeded) in each
    quartile of [0, T) with fixed noise: the loss of the model's prediction target with the true embeddings
    against the same with the embeddings permuted among the images (image i gets image i+1's), and with the
    null embedding if ``null``. ``cond_gain_q{k}`` = 1 - L_true / L_permuted in quartile k (``null_gain_q{k}``
    likewise): 0 for a model that ignores its embedding, 1 for one that predicts perfectly from it alone.
    """
    n, steps = len(x0), diffusion.num_timesteps
    g = torch.Generator().manual_seed(seed)
    q = torch.arange(QUARTILES).repeat_interleave(n)  # [4N]
    t = ((q + torch.rand(len(q), generator=g)) * steps / QUARTILES).long().clamp(max=steps - 1)
    noise = torch.randn((len(q), *x0.shape[1:]), generator=g)
    device = x0.device
    x, t, noise = x0.repeat(QUARTILES, 1, 1, 1), t.to(device), noise.to(device)
    conds = {"true": (h, None), "permuted": (h.roll(1, 0), None)}
    if null:
        conds["null"] = (h, torch.ones(len(q), dtype=torch.bool, device=device))
    losses = {}
    for name, (c, drop) in conds.items():
        c = c.repeat(QUARTILES, 1)
        parts = [diffusion.training_losses(model, x[i:i + chunk], t[i:i + chunk], c[i:i + chunk], noise[i:i + chunk],
                                           drop=None if drop is None else drop[i:i + chunk])["mse"]
                 for i in range(0, len(q), chunk)]
        losses[name] = torch.cat(parts).float().cpu()
    out = {}
    for k in range(QUARTILES):
        m = q == k
        true = losses["true"][m].mean()
        out[f"cond_gain_q{k}"] = float(1 - true / losses["permuted"][m].mean())
        if null:
            out[f"null_gain_q{k}"] = float(1 - true / losses["null"][m].mean())
    return out


class Evaluator:
    def __init__(self, cfg: TrainConfig, info: DatasetInfo, tracker: Tracker, device: torch.device):
        self.cfg, self.tracker, self.device = cfg, tracker, device
        split = cfg.data.heldout_split
        if split not in info.manifest.splits:
            log.warning("dataset has no %s split: grids and faithfulness condition on the first training images",
                        split)
            split = info.split
        self.held = info.with_split(split)
        self.process = cfg.process()
        self._held = None  # (images, embeddings, keys): the split's first images, read once for every use
        self._diag = None  # (diffusion, images, embeddings) on the device
        self.diagnostics: list[dict] = []  # every diagnose() result, for conditioning.json

    def evaluate(self, ema: torch.nn.Module, step: int, final: bool) -> dict:
        """What is due at ``step``: a grid every ``train.sample_every`` steps and at the last one; at the last
        one (``final``) also the diagnostic's JSON, faithfulness, the embedding invariance index and, when configured,
        fidelity. Returns the metrics it logged."""
        if step % self.cfg.train.sample_every == 0 or final:
            self.grid(ema, step)
        if not final:
            return {}
        metrics = dict(self.diagnostics[-1]) if self.diagnostics else {}
        if self.diagnostics:
            self._write_json("conditioning.json", {"final": self.diagnostics[-1], "history": self.diagnostics,
                                                   "images": self.cfg.diagnostic.images, "split": self.held.split})
        encoder = self._encoder()
        if encoder is None:
            return metrics
        samples = None
        if self.cfg.faithfulness.images:
            faith, samples = self.faithfulness(ema, step, encoder)
            metrics.update(faith)
        if self.cfg.invariance.images:
            metrics.update(self.invariance(encoder, step))
        if self.cfg.fidelity.features and samples is not None:
            metrics.update(self.fidelity(encoder, samples, step))
        return metrics

    def diagnose(self, ema: torch.nn.Module, step: int) -> dict:
        """The conditioning gains (``conditioning_gains``) of the EMA model on the fixed held-out batch."""
        d = self.cfg.diagnostic
        if not d.images:
            return {}
        if self._diag is None:
            x, h, _ = self._first(d.images)
            self._diag = (self.process.build(), x.to(self.device), h.to(self.device))
        diffusion, x, h = self._diag
        if len(x) < 2:
            return {}
        with autocast(self.device):
            gains = conditioning_gains(ema, diffusion, x, h, d.seed, null=ema.cfg.null_embedding)
        self.diagnostics.append({"step": step, **gains})
        return gains

    def _first(self, count: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The held-out split's first ``count`` images, embeddings and keys (grids, diagnostic, faithfulness,
        invariance share one read)."""
        if self._held is None:
            c = self.cfg
            self._held = heldout(self.held, max(c.grid.images, c.diagnostic.images, c.faithfulness.images,
                                                  c.invariance.images, 1),
                                 c.storage)
        x, h, keys = self._held
        return x[:count], h[:count], keys[:count]

    def _write_json(self, name: str, obj: dict) -> None:
        fs, root = open_fs(self.cfg.run_root, self.cfg.storage)
        write_json(fs, join(root, name), obj)
        self.tracker.log_bytes(json.dumps(obj, indent=2).encode(), name)

    def _draw(self, ema, h: torch.Tensor, steps: str, seed: int, guidance: float) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return draw(ema, self.process, h.to(self.device), steps, sampler_for(steps), 64, gen, guidance)

    def grid(self, ema, step: int) -> None:
        """Each held-out image beside its samples; the same noise at every step, so grids compare."""
        x, h, _ = self._first(self.cfg.grid.images)
        samples = self._draw(ema, h.repeat_interleave(self.cfg.grid.samples, 0), self.cfg.grid.steps,
                             self.cfg.train.seed, self.cfg.grid.guidance)
        png = grid_png(x, samples)
        name = f"step-{step:09d}.png"
        fs, root = open_fs(self.cfg.run_root, self.cfg.storage)
        with atomic_open(fs, join(root, "samples", name)) as f:
            f.write(png)
        self.tracker.log_bytes(png, f"samples/{name}")

    def _encoder(self):
        """The frozen encoder the dataset was embedded with, for the end-of-run checks; None (and a tag saying
        why) when its file is missing: the model is trained, and that must not fail the job."""
        cfg, rec = self.cfg, self.held.encoder_record
        if not (cfg.faithfulness.images or cfg.invariance.images):
            return None
        try:
            encoder = build_recorded_encoder(cfg.encoder.name, rec.arch, rec.weights, allow_url=cfg.data.allow_url)
        except UserError as e:
            log.warning("end-of-run checks skipped: %s", e)
            self.tracker.set_tag("faithfulness", f"skipped: {e}")
            return None
        encoder.preprocess = Preprocess.from_dict(rec.preprocess)
        return encoder.to(self.device)

    def faithfulness(self, ema, step: int, encoder) -> tuple[dict, torch.Tensor | None]:
        """The RCDM faithfulness protocol on the first held-out embeddings, from the EMA model: scalars as
        metrics at the final step, the full result with per-image ranks as ``faithfulness.json``. Returns the
        metrics and the samples (one per embedding, for the fidelity check)."""
        cfg = self.cfg
        _, h, keys = self._first(cfg.faithfulness.images)
        if len(keys) < 2:
            self.tracker.set_tag("faithfulness", f"skipped: split {self.held.split} has fewer than 2 images")
            return {}, None
        t0 = time.perf_counter()
        samples = self._draw(ema, h, cfg.faithfulness.steps, cfg.train.seed + 1, cfg.faithfulness.guidance)
        result = faithfulness(h, samples, encoder, cfg.level.name)
        result.update(split=self.held.split, keys=keys, steps=cfg.faithfulness.steps,
                      guidance=cfg.faithfulness.guidance, seconds=time.perf_counter() - t0, model_step=step)
        flat = flat_metrics(result)
        self.tracker.log_metrics(flat, step, int(time.time() * 1000), once=True)  # the loss already logged this step
        self._write_json("faithfulness.json", result)
        log.info("faithfulness on %d held-out images (%s, guidance %g): MRR %.3f [%.3f, %.3f], top-1 %.3f, "
                 "mean rank %.2f (chance MRR %.3f)", result["n"], cfg.faithfulness.steps, cfg.faithfulness.guidance,
                 result["mrr"], *result["mrr_ci95"], result["top1"], result["mean_rank"], result["chance"]["mrr"])
        return flat, samples

    def invariance(self, encoder, step: int) -> dict:
        """The embedding invariance index of this job's level per augmentation family, on the first held-out
        images: ``invariance_<family>`` metrics and ``invariance.json`` (cosines and the cross-image baseline)."""
        x, _, keys = self._first(self.cfg.invariance.images)
        if len(keys) < 2:
            return {}
        level = self.cfg.level.name
        x01 = ((x.float() + 1) / 2).clamp(0, 1)
        g = torch.Generator().manual_seed(self.cfg.invariance.seed)
        clean = {level: invariance.embed(encoder, x01)[level]}
        views = {f: {level: invariance.embed(encoder, invariance.augment(f, x01, g))[level]}
                 for f in invariance.FAMILIES}
        result = invariance.embedding_invariance(clean, views)
        table = {f: result[f][level] for f in invariance.FAMILIES}
        self._write_json("invariance.json", {"level": level, "images": len(keys), "split": self.held.split,
                                             "cosine_other": result["cosine_other"][level], "families": table})
        flat = {f"invariance_{f}": v["invariance_index"] for f, v in table.items()}
        self.tracker.log_metrics(flat, step, int(time.time() * 1000), once=True)
        return flat

    def fidelity(self, encoder, samples: torch.Tensor, step: int) -> dict:
        """FID and precision/recall of the faithfulness samples against the same held-out images."""
        kind = self.cfg.fidelity.features
        x, _, _ = self._first(len(samples))
        extractor = (fidelity.EncoderFeatures(encoder, self.cfg.level.name) if kind == "encoder"
                     else fidelity.InceptionFeatures(self.device))
        result = fidelity.fidelity(fidelity.extract(extractor, samples), fidelity.extract(extractor, x.to(samples)))
        result.update(features=kind, reference=f"{self.held.split}: the first {len(x)} images")
        self._write_json("fidelity.json", result)
        flat = {f"fidelity_{k}": result[k] for k in ("fid", "precision", "recall") if result.get(k) is not None}
        self.tracker.log_metrics(flat, step, int(time.time() * 1000), once=True)
        return flat
