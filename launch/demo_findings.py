"""The paper's findings on the shipped demo RCDMs (rcdm/demo_models), from the shipped files alone: every
figure and number of the README's "What the demo models show".

    python launch/demo_findings.py                 # ~15 CPU minutes; writes docs/demo/
    python launch/demo_findings.py --out /tmp/f --images 16 --steps ddim10   # a quick look

Each part is one launch/analyze.py command on the demo models (printed as it runs, so any one can be rerun
alone); their outputs go to <out>/runs/, and the summary figures, findings.json and findings.md to <out>/.
Images: the demo generator's "analysis" split, rendered with known generative factors, that no encoder,
RCDM or factor reader trained on.
"""
import argparse
import json
import logging
import shlex
from pathlib import Path

import torch

from rcdm import demo_release, synthetic
from rcdm.analysis.commands import SYNTHETIC_SEED, SYNTHETIC_SPLIT, AnalyzeConfig, load_inputs, run_analysis
from rcdm.device import pick_device
from rcdm.errors import cli_errors
from rcdm.grids import png_grid
from rcdm.sampling import draw, encode_pil, load_with_encoder

ENCODERS = ("vicreg", "dino", "barlow", "simclr")
LEVELS = ("backbone", "projector")
POINTS, MID = 8, 4  # interpolation: points on the path, and the one shown as its middle (alpha 4/7)
log = logging.getLogger("rcdm.demo_findings")


def analyze(out: Path, part: str, **kw) -> dict:
    """One launch/analyze.py command (printed) -> its JSON numbers."""
    cfg = AnalyzeConfig(output=str(out / "runs" / part), **kw)
    args = " ".join(f"{k}={_arg(v)}" for k, v in kw.items())
    print(f"python launch/analyze.py {args} output={cfg.output}", flush=True)
    return json.loads(Path(run_analysis(cfg)["json"]).read_text())


def _arg(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(str, v)) + "]"
    return shlex.quote(str(v))


def pick_pair(count: int = 200) -> tuple[int, int]:
    """Two analysis images that differ in shape, colour and background, both in colour: a path between them
    has three factors to carry over."""
    fs = [synthetic.factors(SYNTHETIC_SEED, SYNTHETIC_SPLIT, i) for i in range(count)]
    for i, a in enumerate(fs):
        for j, b in enumerate(fs[i + 1:], i + 1):
            if not a["grayscale"] and not b["grayscale"] and all(a[k] != b[k] for k in ("shape", "colour",
                                                                                          "background")):
                return i, j
    raise RuntimeError("no such pair among the first images")


def samples_figure(encs: list[str], images: int, steps: str, guidance: float, device) -> bytes:
    """Top row: held-out images; then one row per demo model: a sample from that model's embedding of each."""
    inputs = load_inputs(f"synthetic:{images}", 32)
    rows, shown = [], None
    for enc in encs:
        for level in LEVELS:
            loaded, encoder = load_with_encoder(f"demo:{enc}-{level}", device, download=False)
            h, shown = encode_pil(inputs.pils, encoder, encoder.preprocess, level, 32, device)
            gen = torch.Generator(device=device).manual_seed(0)
            rows.append(draw(loaded.model, loaded.process, h, steps, "ddim" if steps.startswith("ddim") else "ddpm",
                             64, gen, guidance).cpu())
    return png_grid(torch.cat([shown.cpu()] + rows), images)


def faithfulness_figure(encs: list[str], table: dict, guidances: list[float]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    width = 0.8 / (len(LEVELS) * len(guidances))
    chance = None
    for j, (level, g) in enumerate((lv, g) for lv in LEVELS for g in guidances):
        xs = [i + (j - (len(LEVELS) * len(guidances) - 1) / 2) * width for i in range(len(encs))]
        rs = [table[f"{e}-{level}"][str(g)] for e in encs]
        mrr = [r["mrr"] for r in rs]
        err = [[r["mrr"] - r["mrr_ci95"][0] for r in rs], [r["mrr_ci95"][1] - r["mrr"] for r in rs]]
        ax.bar(xs, mrr, width, yerr=err, capsize=2, label=f"{level}, guidance {g:g}")
        chance = rs[0]["chance"]["mrr"]
    ax.axhline(chance, color="k", ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(encs)), encs)
    ax.set_ylabel("faithfulness MRR (95 % CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def fmt(x: float, ci: list[float] | None = None) -> str:
    return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/demo")
    ap.add_argument("--images", type=int, default=64, help="held-out images per analysis (default: %(default)s)")
    ap.add_argument("--steps", default="ddim25")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0],
                    help="faithfulness at these classifier-free guidance scales (the first is used elsewhere)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with cli_errors():
        device = pick_device(args.device)
        common = dict(steps=args.steps, device=args.device, download=False)
        images = f"synthetic:{args.images}"
        g0 = args.guidance[0]
        encs = list(args.encoders)
        findings: dict = {"encoders": encs, "steps": args.steps,
                          "images": f"{args.images} held-out images (synthetic split {SYNTHETIC_SPLIT!r})",
                          "models": {n: demo_release.record(n)["training"] for n in demo_release.available()}}
        for rec in findings["models"].values():
            rec.pop("recipe", None)

        (out / "samples.png").write_bytes(samples_figure(encs, min(args.images, 12), args.steps, g0, device))

        faith = findings["faithfulness"] = {}
        for enc in encs:
            for level in LEVELS:
                name = f"{enc}-{level}"
                faith[name] = {}
                for g in args.guidance:
                    r = analyze(out, f"faithfulness/{name}/guidance{g:g}", analysis="faithfulness",
                                checkpoint=f"demo:{name}", images=images, guidance=g, **common)
                    faith[name][str(g)] = {k: r[k] for k in ("n", "mrr", "mrr_ci95", "top1", "top1_ci95",
                                                             "mean_rank", "chance")}
        (out / "faithfulness.png").write_bytes(faithfulness_figure(encs, faith, args.guidance))

        inv = findings["invariance"] = {}
        for enc in encs:
            r = analyze(out, f"invariance/{enc}", analysis="invariance", images=images, guidance=g0,
                        checkpoint=[f"demo:{enc}-backbone", f"demo:{enc}-projector"], **common)
            inv[enc] = {"embedding": r["embedding"], "samples": r["samples"],
                        "factor_predictor": r.get("factor_predictor")}
            if enc == encs[0]:
                (out / "invariance.png").write_bytes((out / "runs" / f"invariance/{enc}" / "invariance.png")
                                                     .read_bytes())

        a, b = pick_pair()
        pair = [f"synthetic/{SYNTHETIC_SPLIT}/{a}", f"synthetic/{SYNTHETIC_SPLIT}/{b}"]
        interp = findings["interpolation"] = {}
        for enc in encs:
            r = analyze(out, f"interpolate/{enc}", analysis="interpolate", checkpoint=f"demo:{enc}-backbone",
                        images=pair, points=POINTS, rows=3, guidance=g0, **common)
            interp[enc] = {k: r[k] for k in ("alphas", "sample_cosine_to_a", "sample_cosine_to_b",
                                             "monotone_fraction", "factors")}
        interp["pair"] = pair
        (out / "interpolation.png").write_bytes((out / "runs" / f"interpolate/{encs[0]}" / "interpolate.png")
                                                .read_bytes())

        manip = findings["manipulation"] = {}
        src, tgt = b, a  # B's neighbours define the attribute, A receives it
        for enc in encs:
            r = analyze(out, f"manipulate/{enc}", analysis="manipulate", checkpoint=f"demo:{enc}-backbone",
                        images="synthetic:256", source=f"synthetic/{SYNTHETIC_SPLIT}/{src}",
                        target=f"synthetic/{SYNTHETIC_SPLIT}/{tgt}", samples=8, guidance=g0, **common)
            manip[enc] = {k: r[k] for k in ("transfer", "distance_to_neighbours_edited",
                                            "distance_to_neighbours_target", "other_dims_shift", "source", "target")}
        (out / "manipulation.png").write_bytes((out / "runs" / f"manipulate/{encs[0]}" / "manipulate.png")
                                               .read_bytes())

        adv = findings["adversarial"] = {}
        for enc in encs:
            r = analyze(out, f"adversarial/{enc}", analysis="adversarial", checkpoint=f"demo:{enc}-backbone",
                        images=images, task="shape", guidance=g0, **common)
            adv[enc] = {k: r[k] for k in ("task", "images", "models", "samples", "supervised_test_accuracy",
                                          "ssl_flips_less_at_smallest_epsilon")}
        for suffix in ("", "_samples"):
            (out / f"adversarial{suffix}.png").write_bytes(
                (out / "runs" / f"adversarial/{encs[0]}" / f"adversarial{suffix}.png").read_bytes())

        (out / "findings.json").write_text(json.dumps(findings, indent=2, default=str) + "\n")
        (out / "findings.md").write_text(report(findings, args.guidance))
    print(f"wrote {out}/findings.md, findings.json and the figures")


def report(f: dict, guidances: list[float]) -> str:
    """The README's tables, from findings.json."""
    g0, encs = str(guidances[0]), f["encoders"]
    lines = [f"Images: {f['images']}; sampler {f['steps']}; 95 % intervals (bootstrap for MRR, Wilson for "
             f"proportions).", "", "**Faithfulness** (MRR; chance "
             f"{next(iter(f['faithfulness'].values()))[g0]['chance']['mrr']:.3f})", "",
             "| encoder | " + " | ".join(f"{lv}, guidance {g:g}" for lv in LEVELS for g in guidances) + " |",
             "|---|" + "---|" * (len(LEVELS) * len(guidances))]
    for enc in encs:
        rs = [f["faithfulness"][f"{enc}-{lv}"][str(g)] for lv in LEVELS for g in guidances]
        cells = [fmt(r["mrr"], r["mrr_ci95"]) for r in rs]
        lines.append(f"| {enc} | " + " | ".join(cells) + " |")
    lines += ["", "**Invariance in samples**: share of samples, conditioned on the augmented view, that show the "
              "view's changed factor (follows view: low = invariant) and the original's shape (kept)", "",
              "| encoder | family | factor | backbone follows view | projector follows view | backbone keeps shape "
              "| projector keeps shape | embedding invariance index b / p |", "|---|---|---|---|---|---|---|---|"]
    for enc in encs:
        inv = f["invariance"][enc]
        for fam, factor in (("colour_jitter", "colour"), ("grayscale", "grayscale"), ("crop_position", "x"),
                            ("crop_scale", "scale"), ("flip", "x")):
            s = inv["samples"]
            if not isinstance(s, dict) or fam not in s.get("backbone", {}):
                continue
            cells = []
            for lv in LEVELS:
                e = s[lv][fam]
                v = e["follows_view"].get(factor)
                cells.append(fmt(v, e["follows_view_ci95"][factor]) + f" (n={e['changed'][factor]})"
                             if v is not None else "n/a")
            for lv in LEVELS:
                e = s[lv][fam]
                cells.append(fmt(e["preserved"]["shape"], e["preserved_ci95"]["shape"]))
            emb = inv["embedding"][fam]
            cells.append(f"{emb['backbone']['invariance_index']:.2f} / {emb['projector']['invariance_index']:.2f}")
            lines.append(f"| {enc} | {fam} | {factor} | " + " | ".join(cells) + " |")
    lines += ["", f"**Interpolation** ({f['interpolation']['pair'][0]} to {f['interpolation']['pair'][1]}, backbone "
              "models): share of the differing factors the samples show as A's / B's at each end and the middle", "",
              "| encoder | factors that differ | " + " | ".join(
                  f"alpha {f['interpolation'][encs[0]]['alphas'][i]:.2f}: A / B" for i in (0, MID, -1))
              + " | monotone |",
              "|---|---|---|---|---|---|"]
    for enc in encs:
        r = f["interpolation"][enc]
        fa = r["factors"]
        ends = " | ".join(f"{fa['shows_a'][i]:.2f} / {fa['shows_b'][i]:.2f}" for i in (0, MID, -1)) \
            if fa["shows_a"] else "n/a | n/a | n/a"
        lines.append(f"| {enc} | {', '.join(fa['differing'])} | {ends} | {r['monotone_fraction']:.2f} |")
    lines += ["", "**Manipulation** (backbone models; transfer > 0: the edited embedding's samples carry the "
              "neighbours' shared dimensions)", "", "| encoder | transfer | other dimensions' shift |", "|---|---|---|"]
    for enc in encs:
        r = f["manipulation"][enc]
        lines.append(f"| {enc} | {r['transfer']:.2f} | {r['other_dims_shift']:.2f} |")
    lines += ["", "**Adversarial** (FGSM on shape; backbone models): prediction flip rate of the supervised "
              "classifier and of the linear probe on the SSL embedding, and the share of RCDM samples from the "
              "perturbed SSL embedding whose shape the factor reader reads as the true one", ""]
    eps = f["adversarial"][encs[0]]["models"]["ssl"]["epsilon"]
    lines += ["| encoder | " + " | ".join(f"eps {e:g}: sup / ssl flips, samples true" for e in eps) + " |",
              "|---|" + "---|" * len(eps)]
    for enc in encs:
        r = f["adversarial"][enc]
        cells = [f"{r['models']['supervised']['flip_rate'][i]:.2f} / {r['models']['ssl']['flip_rate'][i]:.2f}, "
                 f"{r['samples']['samples_show_true'][i]:.2f}" for i in range(len(eps))]
        lines.append(f"| {enc} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
