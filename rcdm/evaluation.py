"""Evaluation of a training job's EMA model, kept out of the training loop: the conditioning diagnostic at
every logging step, sample grids on fixed held-out images during training, and at the end the RCDM
faithfulness protocol. Rank 0 only; the loop calls ``Evaluator.diagnose`` with its logged metrics and
``Evaluator.evaluate`` after every step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass

import torch

from rcdm.analysis import ANALYSES, faithfulness, fidelity, invariance
from rcdm.analysis.base import Inputs, Labels, Reference, Result
from rcdm.analysis.factors import synthetic_reader
from rcdm.config import TrainConfig
from rcdm.data import DatasetInfo, heldout, heldout_factors, labelled_embeddings
from rcdm.device import autocast
from rcdm.encoders import EncoderCard, build_recorded_encoder
from rcdm.errors import UserError
from rcdm.grids import samples_png
from rcdm.model_card import LoadedRCDM, ModelCard
from rcdm.preprocess import Preprocess
from rcdm.sampling import Sampling, draw
from rcdm.stats import finite, mapping
from rcdm.storage import atomic_open, join, open_fs, read_json, write_json
from rcdm.tracking import Tracker

log = logging.getLogger(__name__)
QUARTILES = 4
EVALUATED = "evaluated.json"  # in the run root, once the end-of-run evaluation is complete


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


@dataclass(frozen=True)
class Timing:
    """``timing.json``: where the start that finished a run spent its wall seconds (setup, training, grids, the
    conditioning diagnostic, each end-of-run analysis); written by the evaluation, read by the sweep report (a
    malformed file is a ValueError naming the field)."""

    step: int | None
    seconds: dict[str, float]
    total: float
    WHAT = ("wall seconds of the start that finished the run; training excludes the diagnostic and grids, which run "
            "between steps")

    def to_json(self) -> dict:
        return {"step": self.step, "seconds": self.seconds, "total": self.total, "what": self.WHAT}

    @classmethod
    def of(cls, d) -> Timing:
        d = mapping(d, "timing")
        try:
            seconds = {k: finite(v, f"seconds.{k}") for k, v in mapping(d["seconds"], "seconds").items()}
            return cls(d.get("step"), seconds, finite(d["total"], "total"))
        except KeyError as e:
            raise ValueError(f"no {e.args[0]!r}") from None


class Evaluator:
    def __init__(self, cfg: TrainConfig, info: DatasetInfo, tracker: Tracker, device: torch.device, card: ModelCard):
        self.cfg, self.tracker, self.device, self.card = cfg, tracker, device, card
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
        self.seconds: dict[str, float] = {}  # this start's wall seconds: setup, grids, diagnostic, each analysis

    def evaluate(self, ema: torch.nn.Module, step: int, final: bool) -> dict:
        """What is due at ``step``: a grid every ``train.sample_every`` steps and at the last one; at the last
        one (``final``) also the diagnostic's JSON and the end-of-run analyses (``end_analyses``). Returns the
        metrics it logged."""
        if (step % self.cfg.train.sample_every == 0 or final) and self.cfg.grid.images:  # grid.images=0: no grids
            with self._timed("grids"):
                self.grid(ema, step)
        if not final:
            return {}
        metrics = dict(self.diagnostics[-1]) if self.diagnostics else {}
        if self.diagnostics:
            self._write_json("conditioning.json", {"final": self.diagnostics[-1], "history": self.diagnostics,
                                                   "images": self.cfg.diagnostic.images, "split": self.held.split})
        encoder = self._encoder()
        done = []
        for name, opts, inputs in self.end_analyses(ema, encoder) if encoder is not None else []:
            t0 = time.perf_counter()
            result = ANALYSES[name].run(inputs, opts)
            took = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + took
            result.numbers.update(split=self.held.split, keys=inputs.names, model_step=step, seconds=took,
                                  **inputs.sampling.describe())
            self._write_json(f"{name}.json", result.numbers)
            self.tracker.log_metrics(result.metrics, step, int(time.time() * 1000), once=True)
            metrics.update(result.metrics)
            done.append(name)
            log.info("end of run, %s on %d held-out images: %s", name, len(inputs.names), _brief(name, result))
        # last: its presence says the run owes nothing more (a relaunch after a failure here evaluates again)
        fs, root = open_fs(self.cfg.run_root, self.cfg.storage)
        write_json(fs, join(root, EVALUATED), {"step": step, "analyses": done})
        return metrics

    @contextlib.contextmanager
    def _timed(self, what: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - t0

    def record_time(self, step: int, train_s: float) -> dict:
        """Where this start's time went (wall seconds: setup, training, grids, the conditioning diagnostic, each
        end-of-run analysis), as ``time_<part>_s`` metrics and ``timing.json``; the report shows it per run."""
        parts = {"setup": self.seconds.get("setup", 0.0), "training": train_s,
                 **{k: v for k, v in self.seconds.items() if k != "setup"}}
        record = Timing(step, {k: round(v, 2) for k, v in parts.items()}, round(sum(parts.values()), 2))
        self._write_json("timing.json", record.to_json())
        metrics = {f"time_{k}_s": v for k, v in record.seconds.items()}
        self.tracker.log_metrics(metrics, step, int(time.time() * 1000), once=True)
        return metrics

    def owed(self, step: int) -> bool:
        """Whether the end-of-run evaluation of ``step`` has not completed: its run stopped after training, in the
        evaluation (an offline Inception, out of memory, a killed job)."""
        fs, root = open_fs(self.cfg.run_root, self.cfg.storage)
        path = join(root, EVALUATED)
        if not fs.exists(path):
            return True
        try:
            return read_json(fs, path).get("step") != step
        except (ValueError, AttributeError):
            return True

    def end_analyses(self, ema: torch.nn.Module, encoder) -> list[tuple[str, object, Inputs]]:
        """(name, options, inputs) of the analyses every run ends with, from the registry: faithfulness, the factor
        reads (where the data records generative factors) and fidelity on one sample per held-out embedding
        (shared), the embedding invariance index of the run's level. Skipped where their image count is 0."""
        cfg, todo = self.cfg, []
        if cfg.faithfulness.images:
            inputs = self._inputs(ema, encoder, cfg.faithfulness.images,
                                  Sampling(cfg.faithfulness.steps, None, cfg.faithfulness.guidance, cfg.train.seed + 1),
                                  labelled=cfg.factor_reads.enabled)
            if len(inputs.names) >= 2:
                todo.append(("faithfulness", faithfulness.Options(), inputs))
                if inputs.reference is not None:
                    todo.append(("factor_reads", cfg.factor_reads, inputs))
                if cfg.fidelity.features:
                    todo.append(("fidelity", fidelity.Options(cfg.fidelity.features), inputs))
            else:
                self.tracker.set_tag("faithfulness", f"skipped: split {self.held.split} has fewer than 2 images")
        if cfg.invariance.images:
            inputs = self._inputs(ema, encoder, cfg.invariance.images, Sampling(seed=cfg.invariance.seed))
            if len(inputs.names) >= 2:
                todo.append(("invariance", invariance.Options(sample=False), inputs))
        return todo

    def _inputs(self, ema, encoder, count: int, sampling: Sampling, labelled: bool = False) -> Inputs:
        """The first ``count`` held-out images; ``labelled``: with their factors, labelled reference embeddings and
        a reader where the dataset records the demo generator's factors (``_labels``)."""
        x, h, keys = self._first(count)
        loaded = LoadedRCDM(ema, self.card, self.cfg.run_root)
        labels = self._labels(len(keys)) if labelled and len(keys) >= 2 else None
        return Inputs(loaded, encoder, x, h, keys, sampling, self.device, labels)

    def _labels(self, count: int) -> Labels | None:
        """The first ``count`` held-out images' factors, the reference and the reader, where the dataset records the
        demo generator's factors; None where it does not."""
        source = self.held.manifest.splits[self.held.split].source
        if source.get("kind") != "synthetic":
            return None
        factors = heldout_factors(self.held, count, self.cfg.storage)
        train = self.held.with_split(self.cfg.data.split)
        ref = labelled_embeddings(train, self.cfg.factor_reads.reference_images, self.cfg.storage)
        if factors is None or ref is None:
            return None
        reader, report = synthetic_reader(self.card.image_size, self.cfg.factor_reads.reader_steps)
        return Labels(factors, Reference(*ref, f"the first {len(ref[1])} images of split {train.split}"), reader,
                      report)

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
        with self._timed("diagnostic"), autocast(self.device):
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
        return draw(ema, self.process, h.to(self.device), Sampling(steps, None, guidance, seed, 64))

    def grid(self, ema, step: int) -> None:
        """Each held-out image beside its samples; the same noise at every step, so grids compare."""
        x, h, _ = self._first(self.cfg.grid.images)
        samples = self._draw(ema, h.repeat_interleave(self.cfg.grid.samples, 0), self.cfg.grid.steps,
                             self.cfg.train.seed, self.cfg.grid.guidance)
        png = samples_png(x, samples)
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
            card = EncoderCard(cfg.encoder.name, rec.arch, cfg.level.name, rec.weights,
                               Preprocess.from_dict(rec.preprocess))
            encoder = build_recorded_encoder(card, allow_url=cfg.data.allow_url)
        except UserError as e:
            log.warning("end-of-run checks skipped: %s", e)
            self.tracker.set_tag("faithfulness", f"skipped: {e}")
            return None
        return encoder.to(self.device)


def _brief(name: str, result: Result) -> str:
    """The analysis's own headline where it has one, else its metrics."""
    headline = getattr(ANALYSES.get(name), "headline", None)
    return headline(result.numbers) if headline else ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())
