"""The sweep report's figures as PNG bytes (matplotlib, no display needed)."""
from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from rcdm.report.collect import JobRun  # noqa: E402

LEVEL_ORDER = ("backbone", "patch_mean", "projector")


def level_key(level: str) -> tuple[int, str]:
    return (LEVEL_ORDER.index(level) if level in LEVEL_ORDER else len(LEVEL_ORDER), level)


def by_encoder(runs: list[JobRun]) -> dict[str, list[JobRun]]:
    """Runs grouped by encoder, each group ordered backbone, patch_mean, projector (then others)."""
    out: dict[str, list[JobRun]] = defaultdict(list)
    for r in runs:
        out[r.encoder].append(r)
    return {e: sorted(rs, key=lambda r: (level_key(r.level), r.name)) for e, rs in sorted(out.items())}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def interval_bars(groups: dict[str, list[tuple[str, float, Sequence[float]]]], ylabel: str, chance: float | None = None,
                  ax=None) -> bytes | None:
    """Grouped bars with 95 % intervals: {group label: [(series label, value, [lo, hi]), ...]}, the series in the
    same order in every group; chance as a dashed line. The report's and the demo findings' bar charts."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 3), 3.8))
    series = list(dict.fromkeys(label for bars in groups.values() for label, _, _ in bars))
    width = 0.8 / len(series)
    for j, label in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        nan = float("nan")
        rows = [dict((lb, (v, ci)) for lb, v, ci in bars).get(label, (nan, [nan, nan])) for bars in groups.values()]
        # a value rounded in its JSON can sit a hair outside its interval: matplotlib refuses negative errors
        err = [[max(0.0, v - ci[0]) for v, ci in rows], [max(0.0, ci[1] - v) for v, ci in rows]]
        ax.bar(xs, [v for v, _ in rows], width, yerr=err, capsize=2, label=label)
    if chance is not None:
        ax.axhline(chance, ls="--", c="k", lw=1, label=f"chance {chance:.3f}")
    many = len(groups) > 4
    ax.set_xticks(range(len(groups)), list(groups), fontsize=7, rotation=45 if many else 0,
                  ha="right" if many else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7, ncol=min(len(series) + 1, 4), loc="upper center", bbox_to_anchor=(0.5, -0.22 if many else
                                                                                          -0.12))
    return _png(fig) if own else None


def faithfulness_figure(runs: list[JobRun]) -> bytes | None:
    """MRR and top-1 with their 95 % intervals per run, chance as a dashed line."""
    rows = [r for r in runs if "faithfulness" in r.end]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 0.9 * len(rows) + 3), 3.6))
    f = [r.end["faithfulness"] for r in rows]
    for ax, key, title in zip(axes, ("mrr", "top1"), ("faithfulness MRR", "top-1 rate")):
        interval_bars({f"{r.encoder}\n{r.level}": [(title, getattr(x, key).value, list(getattr(x, key).ci95))]
                       for r, x in zip(rows, f)}, title, chance=getattr(f[0], f"chance_{key}"), ax=ax)
    return _png(fig)


def factor_figure(runs: list[JobRun]) -> bytes | None:
    """What each run's samples keep: the share read as the original's shape, colour and background (95 %
    intervals), beside the embedding's bound for shape."""
    rows = [r for r in runs if "factor_reads" in r.end]
    if not rows:
        return None
    groups = {}
    for r in rows:
        t = r.end["factor_reads"].factors
        bars = [(k, t[k].samples.value, list(t[k].samples.ci95)) for k in ("shape", "colour", "background") if k in t]
        if "shape" in t and t["shape"].bound is not None:
            bars.append(("shape: embedding bound", t["shape"].bound, [t["shape"].bound] * 2))
        if bars:  # a run that reads none of these factors has no bars here (its table row says what it reads)
            groups[f"{r.encoder}\n{r.level}"] = bars
    return interval_bars(groups, "read as the original's (95 % CI)") if groups else None


def conditioning_figure(runs: list[JobRun]) -> bytes | None:
    """The final conditioning gain per noise quartile, one line per run."""
    rows = [r for r in runs if "cond_gain_q0" in r.metrics]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for r in rows:
        ax.plot(range(4), [r.metrics.get(f"cond_gain_q{k}", float("nan")) for k in range(4)], marker="o",
                ls="-" if r.level == "backbone" else "--", label=f"{r.encoder} {r.level}")
    ax.set_xticks(range(4), ["q0 (least noise)", "q1", "q2", "q3 (most noise)"], fontsize=7)
    ax.set_ylabel("1 - L(true h) / L(permuted h)", fontsize=8)
    ax.set_title("conditioning gain per noise quartile", fontsize=9)
    ax.axhline(0, c="k", lw=0.5)
    ax.legend(fontsize=6, ncol=2)
    return _png(fig)


def loss_figure(runs: list[JobRun]) -> bytes | None:
    rows = [r for r in runs if r.loss]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for r in rows:
        steps, values = zip(*r.loss)
        ax.plot(steps, values, ls="-" if r.level == "backbone" else "--", label=f"{r.encoder} {r.level}")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("training loss", fontsize=8)
    ax.set_yscale("log")
    ax.set_title("loss curves", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    return _png(fig)


def samples_figure(runs: list[JobRun]) -> bytes | None:
    """Every run's last grid, one row of panels per encoder, its levels side by side."""
    groups = {e: [r for r in rs if r.grid] for e, rs in by_encoder(runs).items()}
    groups = {e: rs for e, rs in groups.items() if rs}
    if not groups:
        return None
    cols = max(len(rs) for rs in groups.values())
    fig, axes = plt.subplots(len(groups), cols, figsize=(3.2 * cols, 3.4 * len(groups)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (enc, rs) in enumerate(groups.items()):
        for j, r in enumerate(rs):
            axes[i][j].imshow(Image.open(io.BytesIO(r.grid)).convert("RGB"))
            axes[i][j].set_title(f"{enc} {r.level} (step {r.grid_step})", fontsize=9)
    fig.suptitle("each row: a held-out image, then samples from its embedding", fontsize=9)
    return _png(fig)


FIGURES = {"faithfulness.png": faithfulness_figure, "factors.png": factor_figure, "conditioning.png": conditioning_figure,
           "loss.png": loss_figure, "samples.png": samples_figure}


def figures(runs: list[JobRun]) -> dict[str, bytes]:
    """{file name: PNG bytes} of the figures there is data for."""
    out = {name: make(runs) for name, make in FIGURES.items()}
    return {k: v for k, v in out.items() if v is not None}
