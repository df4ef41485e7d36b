"""The paper's findings on the shipped demo RCDMs (rcdm/demo_models), from the shipped files alone: every figure
and number of docs/findings.md. Each part runs analyses of the registry (rcdm.analysis.ANALYSES) on the demo
models and prints the equivalent ``launch/analyze.py`` command, so any one can be rerun alone; their outputs go
to <output>/runs/, the summary figures, findings.json and findings.md to <output>/. Images: the demo generator's
``analysis`` split, rendered with known generative factors, that no encoder, RCDM or factor reader trained on.
"""
from __future__ import annotations

import json
import logging
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rcdm import demo_release, synthetic
from rcdm.analysis import ANALYSES
from rcdm.analysis.base import Inputs, Result
from rcdm.analysis.commands import AnalyzeConfig, run_analysis, write_result
from rcdm.analysis.factor_reads import FactorRead, FactorReads
from rcdm.analysis.faithfulness import Faithfulness
from rcdm.analysis.images import SYNTHETIC_SEED, SYNTHETIC_SPLIT
from rcdm.device import pick_device
from rcdm.grids import cells_png
from rcdm.report.figures import interval_bars
from rcdm.sampling import Sampling, load_with_encoder
from rcdm.storage import open_fs, write_local
from rcdm.stats import Estimate, mean_ci
from rcdm.config import READER_STEPS

log = logging.getLogger(__name__)
LEVELS = ("backbone", "projector")
MID = 4  # interpolation: the path point shown as its middle (alpha 4/7 of 8 points)
# finding 4's edits: the paper's nearest-neighbour transfer, and one named factor moved along its mean difference
# (the factors are known; a larger pool, 1024 images, makes the factor's mean embeddings steadier)
EDITS = (("neighbours", "synthetic:256", {}), ("colour", "synthetic:1024", {"attribute": "colour"}),
         ("shape", "synthetic:1024", {"attribute": "shape"}))


@dataclass
class FindingsConfig:
    """``launch/demo_findings.py``'s config (configs/findings.yaml)."""

    output: str = "docs/demo"
    images: int = 64  # held-out images per analysis
    steps: str = "ddim25"
    guidance: list[float] = field(default_factory=lambda: [1.0, 3.0])  # faithfulness at each; the first elsewhere
    encoders: list[str] = field(default_factory=lambda: ["vicreg", "dino", "barlow", "simclr"])
    device: str = "auto"
    manipulate_pairs: int = 16  # (source, target) pairs the manipulation's transfer is averaged over
    reader_steps: int = READER_STEPS  # training steps of the factor reader and of finding 3's supervised classifier (cached)


class Runner:
    """Runs registry analyses on demo models, prints each as its launch/analyze.py command, keeps its outputs."""

    def __init__(self, cfg: FindingsConfig):
        self.cfg, self.out = cfg, Path(cfg.output)
        self.device = pick_device(cfg.device)
        self._models: dict[str, tuple] = {}

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = load_with_encoder(f"demo:{name}", self.device, download=False)
        return self._models[name]

    def inputs(self, names: list[str], images, guidance: float) -> Inputs:
        (loaded, encoder), others = self.model(names[0]), [self.model(n) for n in names[1:]]
        return Inputs.of_images(loaded, encoder, images, Sampling(self.cfg.steps, None, guidance), self.device, others,
                                download=False)

    def run(self, part: str, analysis: str, models: list[str], images, guidance: float, **options) -> dict:
        module = ANALYSES[analysis]
        takes = hasattr(module.Options, "reader_steps")  # the analyses that read factors take it
        if takes and self.cfg.reader_steps != READER_STEPS:
            options["reader_steps"] = self.cfg.reader_steps
        checkpoint = f"demo:{models[0]}" if len(models) == 1 else "[" + ",".join(f"demo:{m}" for m in models) + "]"
        out = self.out / "runs" / part
        args = [f"analysis={analysis}", f"checkpoint={checkpoint}", f"images={_arg(images)}",
                f"steps={self.cfg.steps}", f"guidance={guidance:g}", *(f"{analysis}.{k}={_arg(v)}"
                                                                          for k, v in options.items()), f"output={out}"]
        print("python launch/analyze.py " + " ".join(args), flush=True)
        result: Result = module.run(self.inputs(models, images, guidance), module.Options(**options))
        write_result(out, analysis, result)
        return result.numbers

    def figure(self, part: str, analysis: str, suffix: str = "") -> bytes:
        return (self.out / "runs" / part / f"{analysis}{suffix}.png").read_bytes()


def _arg(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(str, v)) + "]"
    return shlex.quote(str(v))


def pick_pairs(count: int, pool: int = 400) -> list[tuple[int, int]]:
    """``count`` pairs of coloured analysis images that differ in shape, colour and background."""
    fs = [synthetic.factors(SYNTHETIC_SEED, SYNTHETIC_SPLIT, i) for i in range(pool)]
    pairs = []
    for i, a in enumerate(fs):
        for j in range(i + 1, pool):
            b = fs[j]
            if not a["grayscale"] and not b["grayscale"] and all(a[k] != b[k] for k in ("shape", "colour",
                                                                                          "background")):
                pairs.append((i, j))
                break
        if len(pairs) == count:
            return pairs
    raise RuntimeError("not enough such pairs among the analysis images")


def samples_figure(run: Runner, encs: list[str], images: int, guidance: float) -> bytes:
    """Top row: held-out images; then one row per demo model: a sample from that model's embedding of each."""
    rows, shown = [], None
    for enc in encs:
        for level in LEVELS:
            inputs = run.inputs([f"{enc}-{level}"], f"synthetic:{images}", guidance)
            rows.append(inputs.own_samples())
            shown = inputs.images
    return cells_png(torch.cat([shown] + rows), images)


def run_findings(cfg: FindingsConfig) -> dict:
    """Every part, then findings.json and findings.md in ``cfg.output``; returns the findings."""
    run, out = Runner(cfg), Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    encs, g0, images = list(cfg.encoders), cfg.guidance[0], f"synthetic:{cfg.images}"
    findings: dict = {"encoders": encs, "steps": cfg.steps, "guidance": g0,
                      "images": f"{cfg.images} held-out images (synthetic split {SYNTHETIC_SPLIT!r})",
                      "models": {n: demo_release.record(n).training.to_dict() for n in demo_release.available()}}
    write_local(out / "samples.png", samples_figure(run, encs, min(cfg.images, 12), g0))

    faith = findings["faithfulness"] = {}
    for enc in encs:
        for level in LEVELS:
            name = f"{enc}-{level}"
            faith[name] = {str(g): _pick(run.run(f"faithfulness/{name}/guidance{g:g}", "faithfulness", [name],
                                                 images, g), "n", "mrr", "mrr_ci95", "top1", "top1_ci95", "chance")
                           for g in cfg.guidance}
    mrr = _faithfulness(faith)
    write_local(out / "faithfulness.png", interval_bars(
        {f"{e}\n{lv}": [(f"guidance {g:g}", mrr[f"{e}-{lv}"][str(g)].mrr.value, mrr[f"{e}-{lv}"][str(g)].mrr.ci95)
                        for g in cfg.guidance] for e in encs for lv in LEVELS},
        "faithfulness MRR (95 % CI)", chance=next(iter(mrr.values()))[str(g0)].chance_mrr))

    reads = findings["factor_reads"] = {}
    for enc in encs:
        for level in LEVELS:
            name = f"{enc}-{level}"
            reads[name] = run.run(f"factor_reads/{name}", "factor_reads", [name], images, g0)["factors"]
    kept = _factor_reads(reads)
    write_local(out / "factor_reads.png", interval_bars(
        {f"{e}\n{lv}": [(k, kept[f"{e}-{lv}"][k].samples.value, kept[f"{e}-{lv}"][k].samples.ci95)
                        for k in ("shape", "colour", "background")] for e in encs for lv in LEVELS},
        "share of samples read as the original's factor (95 % CI)"))

    inv = findings["invariance"] = {}
    for enc in encs:
        r = run.run(f"invariance/{enc}", "invariance", [f"{enc}-backbone", f"{enc}-projector"], images, g0)
        inv[enc] = _pick(r, "embedding", "samples", "factor_predictor")
    write_local(out / "invariance.png", run.figure(f"invariance/{encs[0]}", "invariance"))

    a, b = pick_pairs(1)[0]
    pair = [f"synthetic/{SYNTHETIC_SPLIT}/{a}", f"synthetic/{SYNTHETIC_SPLIT}/{b}"]
    interp = findings["interpolation"] = {"pair": pair}
    for enc in encs:
        r = run.run(f"interpolate/{enc}", "interpolate", [f"{enc}-backbone"], pair, g0, points=8, rows=3)
        interp[enc] = _pick(r, "alphas", "sample_cosine_to_a", "sample_cosine_to_b", "monotone_fraction", "factors")
    write_local(out / "interpolation.png", run.figure(f"interpolate/{encs[0]}", "interpolate"))

    manip = findings["manipulation"] = {}
    pairs = pick_pairs(cfg.manipulate_pairs)
    for enc in encs:
        manip[enc] = {}
        for edit, pool, options in EDITS:
            rows = [run.run(f"manipulate/{enc}/{edit}/{i}", "manipulate", [f"{enc}-backbone"], pool, g0,
                            source=f"synthetic/{SYNTHETIC_SPLIT}/{s}", target=f"synthetic/{SYNTHETIC_SPLIT}/{t}",
                            samples=8, **options)
                    for i, (s, t) in enumerate(pairs)]
            manip[enc][edit] = manipulation_summary(rows)
    for edit, _, _ in EDITS:
        write_local(out / f"manipulation_{edit}.png", run.figure(f"manipulate/{encs[0]}/{edit}/0", "manipulate"))

    adv = findings["adversarial"] = {}
    for enc in encs:
        r = run.run(f"adversarial/{enc}", "adversarial", [f"{enc}-backbone"], images, g0, task="shape")
        adv[enc] = _pick(r, "task", "images", "models", "samples", "supervised_test_accuracy",
                         "ssl_flips_less_at_smallest_epsilon")
    for suffix in ("", "_samples"):
        write_local(out / f"adversarial{suffix}.png", run.figure(f"adversarial/{encs[0]}", "adversarial", suffix))

    write_local(out / "findings.json", json.dumps(findings, indent=2, default=str) + "\n")
    write_local(out / "findings.md", findings_markdown(findings, cfg.guidance))
    return findings


def manipulation_summary(rows: list[dict]) -> dict:
    """Means over the (source, target) pairs, each with a 95 % bootstrap interval over the pairs: the edit's
    transfer, the embedding numbers, and per factor the reader's transfer and the share of edited samples that
    kept the target's value."""
    out = {"pairs": len(rows)}
    for key in ("transfer", "other_dims_shift", "embedding_along_edit"):
        if all(key in r for r in rows):
            out[key], out[f"{key}_ci95"] = mean_ci([r[key] for r in rows])
    reads = [r["factor_transfer"] for r in rows if r.get("factor_transfer")]
    for factor in dict.fromkeys(k for r in reads for k in r):
        for key, name in (("transfer", "transfer"), ("edited_keeps_target", "kept")):
            vals = [r[factor][key] for r in reads if factor in r]
            out[f"{factor}_{name}"], out[f"{factor}_{name}_ci95"] = mean_ci(vals)
        out[f"{factor}_transfer_pairs"] = len([r for r in reads if factor in r])
    return out


def _pick(d: dict, *keys: str) -> dict:
    return {k: d[k] for k in keys if k in d}


def _ci(x: float | None, ci: list[float] | None = None) -> str:
    return Estimate(x, tuple(ci) if ci else None).format(2)


def _faithfulness(part: dict) -> dict[str, dict[str, Faithfulness]]:
    """findings.json's faithfulness part ({model: {guidance: numbers}}) as records, checked."""
    return {name: {g: Faithfulness.of(r) for g, r in by_g.items()} for name, by_g in part.items()}


def _factor_reads(part: dict) -> dict[str, dict[str, FactorRead]]:
    """findings.json's factor-reads part ({model: {factor: numbers}}) as records, checked."""
    return {name: FactorReads.of({"factors": t}).factors for name, t in part.items()}


def findings_markdown(f: dict, guidances: list[float]) -> str:
    """The tables of docs/demo/findings.md, from findings.json."""
    g0, encs = str(guidances[0]), f["encoders"]
    faith = _faithfulness(f["faithfulness"])
    chance = next(iter(faith.values()))[g0].chance_mrr
    lines = [f"Images: {f['images']}; sampler {f['steps']}, guidance {f['guidance']:g} unless a column says "
             f"otherwise; 95 % intervals (bootstrap for MRR, Wilson for proportions).", "",
             f"**Faithfulness** (MRR; chance {chance:.3f})", "",
             "| encoder | " + " | ".join(f"{lv}, guidance {g:g}" for lv in LEVELS for g in guidances) + " |",
             "|---|" + "---|" * (len(LEVELS) * len(guidances))]
    for enc in encs:
        rs = [faith[f"{enc}-{lv}"][str(g)] for lv in LEVELS for g in guidances]
        lines.append(f"| {enc} | " + " | ".join(r.mrr.format(2) for r in rs) + " |")
    reads = _factor_reads(f["factor_reads"])
    names = list(next(iter(reads.values())))
    lines += ["", "**What the samples keep** (one sample per image; the share read as the original's value, and in "
              "brackets the embedding's bound: a 10-nearest-neighbour vote among 2048 labelled embeddings)", "",
              "| model | " + " | ".join(f"{k} (chance {next(iter(reads.values()))[k].chance:.2f})" for k in names)
              + " |", "|---|" + "---|" * len(names)]
    for name, t in reads.items():
        lines.append(f"| {name} | " + " | ".join(f"{t[k].samples} (bound {_ci(t[k].bound)})" for k in names) + " |")
    lines += ["", "**Invariance in samples** (findings 1 and 2): samples conditioned on the augmented view; among the "
              "images whose factor the view changed, the share of samples that show the view's value (follows view: "
              "low = invariant), and that show the original's shape as well (object kept, view followed)", "",
              "| encoder | view | factor | backbone: follows view | backbone: shape kept and follows | projector: "
              "follows view | projector: shape kept and follows | shape kept, all images b / p | shape bound of the "
              "embedding b / p | embedding invariance index b / p |", "|---|---|---|---|---|---|---|---|---|---|"]
    for enc in encs:
        inv = f["invariance"][enc]
        s = inv["samples"]
        for fam, factor in (("grayscale", "grayscale"), ("colour_jitter", "colour")):
            if not isinstance(s, dict) or fam not in s.get("backbone", {}):
                continue
            cells = []
            for lv in LEVELS:
                e = s[lv][fam]
                cells += [_ci(e["follows_view"].get(factor), e["follows_view_ci95"].get(factor)) +
                          f" (n={e['changed'][factor]})",
                          _ci(e["shape_and_follows_view"].get(factor), e["shape_and_follows_view_ci95"].get(factor))]
            kept = " / ".join(_ci(s[lv][fam]["preserved"]["shape"], s[lv][fam]["preserved_ci95"]["shape"])
                              for lv in LEVELS)
            emb = inv["embedding"][fam]
            bound = " / ".join(_ci(getattr(reads.get(f"{enc}-{lv}", {}).get("shape"), "bound", None))
                               for lv in LEVELS)
            lines.append(f"| {enc} | {fam} | {factor} | " + " | ".join(cells) + f" | {kept} | {bound} | "
                         f"{emb['backbone']['invariance_index']:.2f} / {emb['projector']['invariance_index']:.2f} |")
    pair = f["interpolation"]["pair"]
    lines += ["", f"**Interpolation** ({pair[0]} to {pair[1]}, backbone models): share of the differing factors the "
              "samples show as A's / B's at each end and the middle", "",
              "| encoder | factors that differ | " + " | ".join(
                  f"alpha {f['interpolation'][encs[0]]['alphas'][i]:.2f}: A / B" for i in (0, MID, -1))
              + " | monotone |", "|---|---|---|---|---|---|"]
    for enc in encs:
        r = f["interpolation"][enc]
        fa = r["factors"]
        ends = " | ".join(f"{fa['shows_a'][i]:.2f} / {fa['shows_b'][i]:.2f}" for i in (0, MID, -1)) \
            if fa["shows_a"] else "n/a | n/a | n/a"
        lines.append(f"| {enc} | {', '.join(fa['differing'])} | {ends} | {r['monotone_fraction']:.2f} |")
    m0 = f["manipulation"][encs[0]]
    lines += ["", f"**Manipulation** (backbone models, {m0['colour']['pairs']} (source, target) pairs that differ in "
              "shape, colour and background; 8 samples per embedding; means over the pairs with 95 % bootstrap "
              "intervals). Transfer, read by the factor reader: the share of edited samples showing the source's "
              "value minus that share among the target's own samples (0: nothing carried over, 1: all). Colour and "
              "shape edits: the target's embedding plus the difference between the mean embeddings of 1024 images "
              "with the source's and with the target's value; kept: the share of edited samples that keep the "
              "target's value of the factors not edited. The paper's recipe: the dimensions shared by the source's "
              "10 nearest neighbours among 256 images replace the target's", "",
              "| encoder | colour edit: colour transfer | colour edit: shape / background kept | shape edit: shape "
              "transfer | shape edit: colour / background kept | paper's recipe: colour / shape / background "
              "transfer |", "|---|---|---|---|---|---|"]
    for enc in encs:
        c, sh, nb = (f["manipulation"][enc][e] for e in ("colour", "shape", "neighbours"))
        lines.append(f"| {enc} | {_ci(c.get('colour_transfer'), c.get('colour_transfer_ci95'))} | "
                     f"{_ci(c.get('shape_kept'))} / {_ci(c.get('background_kept'))} | "
                     f"{_ci(sh.get('shape_transfer'), sh.get('shape_transfer_ci95'))} | "
                     f"{_ci(sh.get('colour_kept'))} / {_ci(sh.get('background_kept'))} | "
                     + " / ".join(_ci(nb.get(f"{k}_transfer")) for k in ("colour", "shape", "background")) + " |")
    lines += ["", "**Adversarial** (finding 3; FGSM on the shape label, backbone models, epsilon in 0-255 pixel "
              "units): prediction flip rate of a supervised tiny ResNet trained on the labels and of a linear probe "
              "on the frozen SSL embedding, each attacked through its own gradient; and the share of RCDM samples "
              "from the perturbed SSL embeddings whose shape the factor reader reads as the true one", ""]
    eps = f["adversarial"][encs[0]]["models"]["ssl"]["epsilon"]
    lines += ["| encoder | " + " | ".join(f"eps {e:g}: sup / ssl flips, samples true" for e in eps) + " |",
              "|---|" + "---|" * len(eps)]
    for enc in encs:
        r = f["adversarial"][enc]
        cells = [f"{r['models']['supervised']['flip_rate'][i]:.2f} / {r['models']['ssl']['flip_rate'][i]:.2f}, "
                 f"{r['samples']['samples_show_true'][i]:.2f}" for i in range(len(eps))]
        lines.append(f"| {enc} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


HELD_OUT_COMMAND = ("python launch/analyze.py analysis=factor_reads checkpoint=demo:{name} images=synthetic:{images} "
                    "steps=ddim25 guidance=1")


def read_held_out(name: str, directory: Path, images: int = 256) -> demo_release.DemoRecord:
    """Read what the shipped file ``<directory>/<name>.pt`` keeps, factor by factor, on ``images`` images of the
    demo generator's ``analysis`` split (no model trained on it; its own k-NN bound), exactly as the analysis
    command does, and keep it in the record as ``factor_reads_held_out``: the bar the shipped backbones are held
    to (the run's own read uses the 64 validation images every encoder shares). Returns the record."""
    rec = demo_release.record(name, directory)
    # demo:<name> resolves to this directory's file
    with demo_release.models_from(directory), tempfile.TemporaryDirectory() as tmp:
        run_analysis(AnalyzeConfig(analysis="factor_reads", checkpoint=demo_release.PREFIX + name,
                                   images=f"synthetic:{images}", output=tmp, steps="ddim25", guidance=1.0,
                                   download=False))
        fs, root = open_fs(tmp)
        reads = demo_release.shorten_factor_reads(fs, root)
    rec.factor_reads_held_out = {**reads, "images": images, "split": "analysis", "weights_sha256": rec.sha256,
                                 "command": HELD_OUT_COMMAND.format(name=name, images=images)}
    demo_release.write_record(directory, rec)
    return rec
