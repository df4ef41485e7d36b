"""The analysis commands behind ``launch/analyze.py``: each writes ``<output>/<analysis>.png`` and
``<output>/<analysis>.json``, and logs both to an MLflow run when given one."""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rcdm import synthetic
from rcdm.analysis import adversarial, explore, fidelity, invariance, manipulate
from rcdm.analysis.factors import FactorNetConfig, factor_net, predict
from rcdm.analysis.faithfulness import faithfulness, reencode
from rcdm.device import pick_device
from rcdm.diffusion.schedules import sampler_for
from rcdm.errors import UserError
from rcdm.grids import grid_png, png_grid
from rcdm.preprocess import find_images
from rcdm.probes import factor_labels
from rcdm.sampling import draw, encode_pil, load_images, load_with_encoder

log = logging.getLogger(__name__)
ANALYSES = ("interpolate", "variability", "faithfulness", "manipulate", "invariance", "adversarial", "fidelity")
SYNTHETIC_SEED, SYNTHETIC_SPLIT = 23, "analysis"  # images no encoder, RCDM or factor predictor trained on


@dataclass
class AnalyzeConfig:
    analysis: str
    checkpoint: Any  # a file or run root; invariance: one per level, e.g. [<backbone run>, <projector run>]
    images: Any  # files, a folder, or "synthetic:N" (the demo's generator, factors known)
    output: str = "analysis"
    steps: str = "ddim25"
    sampler: str | None = None  # None: ddim for "ddimN" steps, else ddpm
    guidance: float = 1.0  # classifier-free guidance scale (recorded with every number); 1 = plain conditional
    seed: int = 0
    device: str = "auto"
    download: bool = True
    allow_url: str | None = None  # fetch the encoder weights from this URL, which the checkpoint records (else refused)
    endpoint_url: str | None = None
    batch_size: int = 64
    # interpolate
    points: int = 8
    rows: int = 3
    mode: str = "linear"  # linear | spherical
    # variability, manipulate: samples per embedding
    samples: int = 8
    # faithfulness
    boot: int = 1000
    # manipulate: source's neighbours among images, their shared dims carried onto target
    source: str | None = None
    target: str | None = None
    neighbours: int = 10
    fraction: float = 0.1
    # invariance
    families: list[str] = field(default_factory=lambda: list(invariance.FAMILIES))
    # invariance, adversarial: training steps of the synthetic-factor predictor / supervised baseline
    factor_steps: int = 600
    # adversarial
    task: str = "shape"
    epsilons: list[float] = field(default_factory=lambda: list(adversarial.EPSILONS))
    probe_images: int = 2000
    # fidelity: inception (torch-fidelity's Inception-v3) | encoder (the RCDM's own frozen encoder)
    features: str = "inception"
    # MLflow: log the figure and numbers to this run
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None


@dataclass
class Inputs:
    pils: list
    names: list[str]
    factors: list[dict] | None  # known for synthetic images only


SYNTHETIC_NAME = re.compile(rf"^synthetic/{SYNTHETIC_SPLIT}/(\d+)$")


def load_inputs(spec, size: int) -> Inputs:
    """``images=`` of the analyses: "synthetic:N" (the first N labelled demo images of a split no model
    trained on), a folder, a file, or a list of files and single synthetic images by name
    (``[synthetic/analysis/3,synthetic/analysis/7]``: factors known); resized to the checkpoint's ``size``."""
    if isinstance(spec, str) and spec.startswith("synthetic:") or spec == "synthetic":
        _, _, n = spec.partition(":")
        try:
            count = int(n or 64)
        except ValueError:
            raise UserError(f"images={spec!r}: write synthetic:<count>, e.g. synthetic:64") from None
        return _synthetic(list(range(count)), size)
    items = list(spec) if isinstance(spec, (list, tuple)) else [s.strip() for s in str(spec).split(",") if s.strip()]
    named = [SYNTHETIC_NAME.match(str(i)) for i in items]
    if items and all(named):
        return _synthetic([int(m[1]) for m in named], size)
    if any(named):
        raise UserError(f"images={spec!r} mixes synthetic images and files: give one kind")
    paths = find_images(spec)
    return Inputs(load_images(paths), [str(p) for p in paths], None)


def _synthetic(indices: list[int], size: int) -> Inputs:
    pairs = [synthetic.sample(SYNTHETIC_SEED, SYNTHETIC_SPLIT, i, size) for i in indices]
    return Inputs([p for p, _ in pairs], [f"synthetic/{SYNTHETIC_SPLIT}/{i}" for i in indices], [f for _, f in pairs])


def run_analysis(cfg: AnalyzeConfig) -> dict:
    if cfg.analysis not in ANALYSES:
        raise UserError(f"unknown analysis {cfg.analysis!r}; choose one of {', '.join(ANALYSES)}")
    sampler = sampler_for(str(cfg.steps), cfg.sampler)
    device = pick_device(cfg.device)
    checkpoints = [cfg.checkpoint] if isinstance(cfg.checkpoint, str) else list(cfg.checkpoint)
    if len(checkpoints) > 1 and cfg.analysis != "invariance":
        raise UserError(f"{cfg.analysis} takes one checkpoint, got {len(checkpoints)}")
    loaded, encoder = load_with_encoder(checkpoints[0], device, cfg.download, cfg.endpoint_url, cfg.allow_url)
    inputs = load_inputs(cfg.images, loaded.model.cfg.image_size)
    ctx = _Context(cfg, sampler, device, loaded, encoder, inputs, checkpoints)
    t0 = time.perf_counter()
    pngs, numbers, scalars = ANALYSIS_FUNCS[cfg.analysis](ctx)
    numbers.update(analysis=cfg.analysis, checkpoint=cfg.checkpoint, encoder=loaded.encoder, level=loaded.level,
                   images=inputs.names if len(inputs.names) <= 256 else f"{len(inputs.names)} images",
                   steps=str(cfg.steps), sampler=sampler, guidance=cfg.guidance, seed=cfg.seed,
                   seconds=time.perf_counter() - t0)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, data in pngs.items():
        written.append(out / f"{cfg.analysis}{suffix}.png")
        written[-1].write_bytes(data)
    json_path = out / f"{cfg.analysis}.json"
    json_path.write_text(json.dumps(numbers, indent=2, default=str))
    if cfg.mlflow_run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(cfg.tracking_uri)
        for p in written + [json_path]:
            client.log_artifact(cfg.mlflow_run_id, str(p), "analysis")
        for k, v in scalars.items():
            client.log_metric(cfg.mlflow_run_id, k, v)
    log.info("%s: %s and %s (%s)", cfg.analysis, written[0], json_path, scalars)
    return {"png": str(written[0]), "pngs": [str(p) for p in written], "json": str(json_path), **scalars}


@dataclass
class _Context:
    cfg: AnalyzeConfig
    sampler: str
    device: torch.device
    loaded: object
    encoder: object
    inputs: Inputs
    checkpoints: list[str]

    def encode(self, pils=None):
        """The checkpoint's conditioning embeddings of ``pils`` (default: the inputs) and the images shown."""
        return encode_pil(self.inputs.pils if pils is None else pils, self.encoder, self.encoder.preprocess,
                          self.loaded.level, self.loaded.model.cfg.image_size, self.device)

    def draw(self, h: torch.Tensor, loaded=None) -> torch.Tensor:
        lo = loaded or self.loaded
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        return draw(lo.model, lo.process, h.to(self.device), str(self.cfg.steps), self.sampler,
                    self.cfg.batch_size, gen, self.cfg.guidance).cpu()


def _interpolate(c: _Context):
    if len(c.inputs.pils) != 2:
        raise UserError(f"interpolate takes exactly 2 images, got {len(c.inputs.pils)}: images=[a.png,b.png]")
    h, originals = c.encode()
    lo = c.loaded
    grid, numbers = explore.interpolate(lo.model, c.encoder, lo.level, lo.process, h[0], h[1], c.cfg.points,
                                        c.cfg.rows, c.cfg.mode, str(c.cfg.steps), c.sampler, c.cfg.seed,
                                        c.cfg.guidance)
    scalars = {"interpolate_monotone_fraction": numbers["monotone_fraction"]}
    if c.inputs.factors is not None:  # synthetic images: read the generative factors off the path's samples
        net, report = factor_net(FactorNetConfig(image_size=lo.model.cfg.image_size, steps=c.cfg.factor_steps))
        numbers["factors"] = explore.factor_path(net, grid, *c.inputs.factors)
        numbers["factor_predictor"] = report["test_accuracy"]
        ends = numbers["factors"]["shows_b"]
        if ends:
            scalars["interpolate_shows_b_at_a"], scalars["interpolate_shows_b_at_b"] = ends[0], ends[-1]
    return ({"": explore.interpolation_png(originals[0], originals[1], grid)}, numbers, scalars)


def _at_least_two(c: _Context) -> None:
    if len(c.inputs.pils) < 2:
        raise UserError(f"{c.cfg.analysis} needs at least 2 images, got {len(c.inputs.pils)}")


def _variability(c: _Context):
    _at_least_two(c)
    if c.cfg.samples < 2:
        raise UserError("variability needs samples >= 2")
    h, originals = c.encode()
    n, m = len(h), c.cfg.samples
    samples = c.draw(h.repeat_interleave(m, 0)).view(n, m, *originals.shape[1:])
    v = explore.variability(samples)
    numbers = {k: v[k] for k in ("ratio", "ratio_mean", "within_mean", "between_mean")}
    numbers["samples_per_image"] = m
    return ({"": explore.variability_png(originals, samples, v["within"])}, numbers,
            {"variability_ratio_mean": numbers["ratio_mean"]})


def _faithfulness(c: _Context):
    _at_least_two(c)
    h, originals = c.encode()
    samples = c.draw(h)
    numbers = faithfulness(h.cpu(), samples, c.encoder, c.loaded.level, boot=c.cfg.boot, seed=c.cfg.seed)
    return ({"": grid_png(originals, samples)}, numbers,
            {f"faithfulness_{k}": numbers[k] for k in ("mrr", "top1", "mean_rank", "median_rank")})


def _manipulate(c: _Context):
    cfg = c.cfg
    if not cfg.source or not cfg.target:
        raise UserError("manipulate needs source=<image> (whose neighbours define the attribute) and "
                        "target=<image> (that receives it), and images=<folder> to find the neighbours in")
    pool, pool_shown = c.encode()
    pair = load_inputs([cfg.source, cfg.target], c.loaded.model.cfg.image_size)
    (h_src, h_tgt), shown = c.encode(pair.pils)
    try:
        nn_idx, dims, values = manipulate.shared_dimensions(pool.cpu(), h_src.cpu(), cfg.neighbours, cfg.fraction)
    except ValueError as e:
        raise UserError(f"{e}: add images to the folder or lower neighbours=") from None
    h_edit = manipulate.edit(h_tgt.cpu(), dims, values)
    m = cfg.samples
    samples = c.draw(torch.stack([h_tgt.cpu(), h_edit]).repeat_interleave(m, 0))
    g = reencode(c.encoder, c.loaded.level, samples).cpu()
    numbers = manipulate.transfer_numbers(g[m:], g[:m], dims, values, pool.cpu().std(0) + 1e-6)
    numbers.update(source=cfg.source, target=cfg.target, neighbours=[c.inputs.names[i] for i in nn_idx.tolist()],
                   dims=dims.tolist(), embedding_dim=pool.shape[1], fraction=cfg.fraction, samples_per_embedding=m)
    neighbours = pool_shown[nn_idx[:m]]
    blank = torch.full_like(shown[0], -1)
    # rows: source and its neighbours; the target and samples of its own embedding; the target and edited samples
    row1 = torch.cat([shown[:1], neighbours, blank[None].expand(m - len(neighbours), -1, -1, -1)])
    cells = torch.cat([row1, shown[1:2], samples[:m], shown[1:2], samples[m:]])
    return {"": png_grid(cells, m + 1)}, numbers, {"manipulate_transfer": numbers["transfer"]}


def _invariance(c: _Context):
    cfg = c.cfg
    _at_least_two(c)
    runs = [(c.loaded, c.encoder)] + [load_with_encoder(p, c.device, cfg.download, cfg.endpoint_url, cfg.allow_url)
                                      for p in c.checkpoints[1:]]
    for lo, enc in runs[1:]:
        if (lo.encoder, enc.weights_sha256) != (c.loaded.encoder, c.encoder.weights_sha256):
            raise UserError(f"invariance compares levels of one encoder: {c.checkpoints[0]} is "
                            f"{c.loaded.encoder} and {lo.encoder} ({enc.weights_source}); pick runs of the same one")
    if len({lo.level for lo, _ in runs}) != len(runs):
        raise UserError("invariance: give one checkpoint per level, e.g. checkpoint=[<backbone run>,<projector run>]")
    unknown = [f for f in cfg.families if f not in invariance.FAMILIES]
    if unknown:
        raise UserError(f"unknown augmentation families {unknown}; choose from {', '.join(invariance.FAMILIES)}")
    _, shown = c.encode()
    x01 = (shown + 1) / 2
    g = torch.Generator().manual_seed(cfg.seed)
    views = {f: invariance.augment(f, x01, g) for f in cfg.families}
    clean = invariance.embed(c.encoder, x01)
    view_emb = {f: invariance.embed(c.encoder, v) for f, v in views.items()}
    numbers: dict = {"embedding": invariance.embedding_invariance(clean, view_emb), "samples": {},
                     "families": list(cfg.families), "levels_sampled": [lo.level for lo, _ in runs]}
    samples = {lo.level: {"clean": c.draw(clean[lo.level], lo),
                          **{f: c.draw(view_emb[f][lo.level], lo) for f in cfg.families}} for lo, _ in runs}
    if c.inputs.factors is not None:
        net, report = factor_net(FactorNetConfig(image_size=c.loaded.model.cfg.image_size, steps=cfg.factor_steps))
        numbers["factor_predictor"] = report["test_accuracy"]
        for level, s in samples.items():
            numbers["samples"][level] = invariance.factor_table(net, c.inputs.factors, shown,
                                                                {f: v * 2 - 1 for f, v in views.items()},
                                                                s["clean"], {f: s[f] for f in cfg.families})
    else:
        numbers["samples"] = "factors unknown for these images: use images=synthetic:N for the factor table"
    scalars = {}
    for f in ("colour_jitter", "grayscale"):
        for level, e in numbers["embedding"].get(f, {}).items():
            scalars[f"invariance_{f}_{level}"] = e["invariance_index"]
    if isinstance(numbers["samples"], dict):
        for level, t in numbers["samples"].items():
            if "grayscale" in t and t["grayscale"]["follows_view"]["grayscale"] is not None:
                scalars[f"invariance_samples_follow_grayscale_{level}"] = t["grayscale"]["follows_view"]["grayscale"]
    emb = numbers["embedding"]
    if "backbone" in clean and "projector" in clean:
        numbers["projector_more_invariant"] = {
            f: emb[f]["projector"]["invariance_index"] > emb[f]["backbone"]["invariance_index"] for f in cfg.families}
    # figure: for the first 3 images, one row per family: image, view, a sample per level from the view
    rows = []
    for i in range(min(3, len(shown))):
        for f in cfg.families:
            rows.append(torch.stack([shown[i], views[f][i] * 2 - 1] + [samples[lo.level][f][i] for lo, _ in runs]))
    return {"": png_grid(torch.cat(rows), 2 + len(runs))}, numbers, scalars


def _adversarial(c: _Context):
    cfg = c.cfg
    if c.inputs.factors is None:
        raise UserError("adversarial needs labelled images: images=synthetic:N (the demo's generator)")
    labels = factor_labels(c.inputs.factors)
    if cfg.task not in labels:
        raise UserError(f"unknown task {cfg.task!r}; choose a factor: {', '.join(labels)}")
    size = c.loaded.model.cfg.image_size
    y, mask = labels[cfg.task]
    _, shown = c.encode()
    x, y = shown[mask].to(c.device), y[mask].to(c.device)
    from rcdm.probes import synthetic_set

    train_x, train_f = synthetic_set(cfg.probe_images, 13, "adversarial-probe", size)
    ty, tmask = factor_labels(train_f)[cfg.task]
    probe = adversarial.ssl_probe(c.encoder, c.loaded.level, (train_x[tmask].float() / 127.5 - 1).to(c.device),
                                  ty[tmask].to(c.device))
    # the supervised baseline: trained on labels with no blur / noise augmentation (that would buy it robustness)
    net, report = factor_net(FactorNetConfig(image_size=size, steps=cfg.factor_steps, soften=False))
    models = {"supervised": adversarial.SupervisedHead(net.to(c.device), cfg.task), "ssl": probe}
    results, perturbed = adversarial.attack(models, x, y, tuple(float(e) for e in cfg.epsilons))
    small = next((i for i, e in enumerate(results["ssl"]["epsilon"]) if e > 0), None)
    numbers = {"task": cfg.task, "images": len(x), "models": results,
               "supervised_test_accuracy": report["test_accuracy"][cfg.task],
               "ssl_probe": f"linear probe on frozen {c.loaded.encoder} {c.loaded.level} embeddings, "
                            f"{int(tmask.sum())} training images"}
    scalars = {}
    if small is not None:
        eps = results["ssl"]["epsilon"][small]
        numbers["smallest_epsilon"] = eps
        numbers["ssl_flips_less_at_smallest_epsilon"] = (results["ssl"]["flip_rate"][small]
                                                        < results["supervised"]["flip_rate"][small])
        scalars = {f"adversarial_flip_rate_{m}_eps{eps:g}": results[m]["flip_rate"][small] for m in results}
    # samples conditioned on the perturbed SSL embeddings, and the factor reader's verdict on them: does the
    # sample still show the image's true factor, as the perturbation grows?
    reader, reader_report = factor_net(FactorNetConfig(image_size=size, steps=cfg.factor_steps))
    k = min(4, len(x))
    rows, reads = [], {"epsilon": [], "samples_show_true": [], "samples_show_true_ci95": []}
    for eps, xa in perturbed.items():
        with torch.no_grad():
            h = torch.cat([probe.embed(chunk) for chunk in xa.split(cfg.batch_size)])
        s = c.draw(h)
        hit = predict(reader, s)[cfg.task] == y.cpu()
        reads["epsilon"].append(eps)
        reads["samples_show_true"].append(float(hit.float().mean()))
        reads["samples_show_true_ci95"].append(invariance.wilson(int(hit.sum()), len(hit)))
        rows.append(torch.stack([t for i in range(k) for t in (xa[i].cpu(), s[i])]))
    numbers["samples"] = {**reads, "reader": f"the synthetic-factor predictor ({cfg.task} accuracy "
                                            f"{reader_report['test_accuracy'][cfg.task]:.3f} on rendered images)",
                          "conditioned_on": f"{c.loaded.encoder} {c.loaded.level} embeddings of the images perturbed "
                                            f"against the SSL probe"}
    if small is not None:
        scalars[f"adversarial_samples_show_true_eps{numbers['smallest_epsilon']:g}"] = reads["samples_show_true"][small]
    title = (f"FGSM on {cfg.task}: supervised tiny ResNet vs linear probe on {c.loaded.encoder} "
             f"{c.loaded.level} ({len(x)} images)")
    return ({"": adversarial.curves_png(results, title), "_samples": png_grid(torch.cat(rows), 2 * k)}, numbers,
            scalars)


def _fidelity(c: _Context):
    _at_least_two(c)
    if c.cfg.features == "inception":
        extractor = fidelity.InceptionFeatures(c.device, c.cfg.download)
    elif c.cfg.features == "encoder":
        extractor = fidelity.EncoderFeatures(c.encoder, c.loaded.level)
    else:
        raise UserError(f"unknown features {c.cfg.features!r}; choose inception or encoder")
    h, originals = c.encode()
    samples = c.draw(h)
    numbers = fidelity.fidelity(fidelity.extract(extractor, samples, c.cfg.batch_size),
                                fidelity.extract(extractor, originals, c.cfg.batch_size))
    numbers["features"] = c.cfg.features
    scalars = {f"fidelity_{k}": numbers[k] for k in ("fid", "precision", "recall", "inception_score")
               if numbers.get(k) is not None}
    return {"": grid_png(originals[:16], samples[:16])}, numbers, scalars


ANALYSIS_FUNCS = {"interpolate": _interpolate, "variability": _variability, "faithfulness": _faithfulness,
                  "manipulate": _manipulate, "invariance": _invariance, "adversarial": _adversarial,
                  "fidelity": _fidelity}
