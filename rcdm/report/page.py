"""The sweep report as one self-contained HTML page: every image embedded as a data URI, no script, no
stylesheet or font from the network, so the file opens anywhere (an MLflow artifact view, a laptop offline)."""
from __future__ import annotations

import base64
import datetime as dt
from html import escape

from rcdm.analysis import faithfulness
from rcdm.analysis.invariance import FAMILIES
from rcdm.redaction import scrub
from rcdm.report.collect import JobRun, Sweep
from rcdm.report.figures import by_encoder

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;margin:10px 0}
.ok{color:#2a7a2a}.bad{color:#b02020}.meta{color:#555;font-size:13px}
.grids{display:flex;gap:18px;flex-wrap:wrap;margin:8px 0 18px}.grids figure{margin:0}
figcaption{font-size:12px;color:#444}img.grid{image-rendering:pixelated;width:260px}code{font-size:12px}
"""


def _img(png: bytes, alt: str, cls: str = "") -> str:
    data = base64.b64encode(png).decode()
    return f'<img class="{cls}" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _num(x, fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def _when(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ms else "–"


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escape text before)."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _status(r: JobRun) -> str:
    cls = "ok" if r.status == "FINISHED" else "bad"
    return f'<span class="{cls}">{escape(r.status)}</span>'


def problems_section(sweep: Sweep) -> str:
    items = [f"<li><b>{escape(r.name)}</b> ({escape(r.encoder)} {escape(r.level)}): {escape(r.problem())}</li>"
             for r in sweep.runs if r.problem()]
    items += [f"<li><b>{escape(' '.join(f'{k}={v}' for k, v in job.items()) or 'the sweep')}</b>: {escape(why)}</li>"
              for job, why in sweep.missing]
    items += [f"<li><b>{escape(r.name)}</b>: artifacts listed but not readable yet: {escape(', '.join(r.unread))}</li>"
              for r in sweep.runs if r.unread]
    if not items:
        return ""
    return (f'<div class="warn" id="missing"><b>{len(items)} job(s) without a finished result</b>; the tables show '
            f'what exists so far.<ul>{"".join(items)}</ul></div>')


def results_table(sweep: Sweep) -> str:
    runs = sweep.runs
    fid = any("fidelity" in r.end for r in runs)
    head = ["encoder", "level", "status", *faithfulness.TABLE_HEAD, *(f"cond. gain q{k}" for k in range(4))]
    head += ["FID", "precision", "recall"] if fid else []
    rows = []
    for r in runs:
        f = r.end.get("faithfulness")
        row = [escape(r.encoder), escape(r.level), _status(r)]
        if f:
            row += [f'<td class="num">{escape(c)}</td>' for c in f.cells()]
        else:
            row += ["–"] * len(faithfulness.TABLE_HEAD)
        row += [f'<td class="num">{_num(r.metrics.get(f"cond_gain_q{k}"))}</td>' for k in range(4)]
        if fid:
            d = r.end.get("fidelity")
            row += [f'<td class="num">{_num(getattr(d, k, None), "{:.3g}")}</td>'
                    for k in ("fid", "precision", "recall")]
        rows.append(row)
    note = ('<p class="meta">Faithfulness: one sample per held-out embedding, re-encoded by the same frozen '
            'encoder and ranked among all samples by cosine to its embedding (the RCDM protocol); bootstrap 95 % '
            'intervals over images. Conditioning gain: 1 - loss with the true embedding / loss with another '
            "image's, per quartile of the noise level (q3 = most noise, where colour and layout are decided).")
    if fid:
        feats = {r.end["fidelity"].features for r in runs if "fidelity" in r.end}
        note += (f" FID and precision/recall: the faithfulness samples against the same held-out images, "
                 f"features: {escape(', '.join(sorted(map(str, feats))))}.")
    return _table(head, rows, "results") + note + "</p>"


def factor_table(sweep: Sweep) -> str:
    """Per run and factor: the share of samples read as the original's value [95 % CI], the embedding's bound."""
    runs = [r for r in sweep.runs if "factor_reads" in r.end]
    if not runs:
        return ('<p class="meta">No run logged factor_reads.json: its data records no generative factors (the demo '
                'does), or factor_reads.enabled=false.</p>')
    tables = [r.end["factor_reads"].factors for r in runs]
    names = list(dict.fromkeys(k for t in tables for k in t))
    rows = []
    for r, t in zip(runs, tables):
        rows.append([escape(r.encoder), escape(r.level)] + [
            f'<td class="num">{t[k].samples}'
            f'<br><span class="meta">bound {_num(t[k].bound, "{:.2f}")}</span></td>' if k in t else "–"
            for k in names])
    chance = {k: next(t[k].chance for t in tables if k in t) for k in names}
    return (_table(["encoder", "level", *(f"{escape(k)} (chance {chance[k]:.2f})" for k in names)], rows,
                   "factors") +
            '<p class="meta">What the samples keep: one sample per held-out embedding (the faithfulness samples), its '
            'generative factors read by a classifier trained on labelled images (rcdm.analysis.factors); the share read '
            "as the original's value with a Wilson 95 % interval. Bound: what the embedding itself holds, a 10-nearest-"
            'neighbour vote among labelled training embeddings; a sample cannot be expected to show more.</p>')


def invariance_table(sweep: Sweep) -> str:
    rows = []
    for r in sweep.runs:
        inv = r.end["invariance"].index if "invariance" in r.end else {}
        if inv:
            rows.append([escape(r.encoder), escape(r.level)] +
                        [f'<td class="num">{inv[f]:.3f}</td>' if f in inv else "–" for f in FAMILIES])
    if not rows:
        return ('<p class="meta">No run logged invariance.json (invariance.images=0, or runs from before rcdm '
                'recorded it).</p>')
    return (_table(["encoder", "level", *FAMILIES], rows, "invariance") +
            '<p class="meta">Embedding invariance index: (cos(h(x), h(aug x)) - cos between different images) / '
            '(1 - the latter), on the held-out images: 1 = the augmented view embeds exactly like its image, '
            '0 = like another image. The paper: projector embeddings are more invariant than backbone ones.</p>')


def timing_table(sweep: Sweep) -> str:
    """Where each run's time went, in the start that finished it (timing.json): setup, training, grids, the
    conditioning diagnostic and each end-of-run analysis."""
    runs = [r for r in sweep.runs if "timing" in r.end]
    if not runs:
        return '<p class="meta">No run logged timing.json (runs from before rcdm recorded it).</p>'
    parts = list(dict.fromkeys(k for r in runs for k in r.end["timing"].seconds))
    rows = [[escape(r.encoder), escape(r.level)] +
            [f'<td class="num">{_num(r.end["timing"].seconds.get(k), "{:.1f}")}</td>' for k in parts] +
            [f'<td class="num">{r.end["timing"].total:.1f}</td>'] for r in runs]
    return (_table(["encoder", "level", *(escape(k) for k in parts), "total"], rows, "timing") +
            '<p class="meta">Wall seconds of the start that finished each run: setup (dataset, model, embedding '
            'statistics, tracking), training (data, update, EMA), the sample grids and conditioning diagnostic drawn '
            'between steps, and each end-of-run analysis. A resumed run counts only its last start.</p>')


def grids_section(sweep: Sweep) -> str:
    parts = []
    for enc, rs in by_encoder(sweep.pictured).items():
        keys = {r.end["faithfulness"].keys[:8] for r in rs if "faithfulness" in r.end}
        same = "" if len(keys) <= 1 else ' <span class="bad">(the runs conditioned on different held-out images)</span>'
        figs = []
        for r in rs:
            body = _img(r.grid, f"{r.name} samples", "grid") if r.grid else "<p>no sample grid logged</p>"
            figs.append(f"<figure>{body}<figcaption>{escape(enc)} {escape(r.level)}, step {r.grid_step}, "
                        f"{_status(r)}</figcaption></figure>")
        parts.append(f"<h3>{escape(enc)}{same}</h3><div class='grids'>{''.join(figs)}</div>")
    return ('<p class="meta">Each row: a held-out image (left), then samples drawn from its embedding, from '
            "each run's EMA model at its last grid; the same images in the same rows for every level.</p>" +
            "".join(parts))


def config_differences(sweep: Sweep) -> str:
    runs = sweep.runs
    keys = sorted({k for r in runs for k in r.params})
    diff = [k for k in keys if len({r.params.get(k) for r in runs}) > 1]
    if not diff:
        return '<p class="meta">Every run has the same resolved config.</p>'
    head = ["key", *(escape(r.name) for r in runs)]
    rows = [[f"<code>{escape(k)}</code>", *(escape(str(r.params.get(k, "–"))) for r in runs)] for k in diff]
    equal = f'<p class="meta">{len(keys) - len(diff)} other keys are equal in all runs.</p>'
    return _table(head, rows, "config") + equal


def provenance_table(sweep: Sweep) -> str:
    rows = [[escape(r.name), _status(r), f"<code>{escape(r.run.info.run_id)}</code>",
             f"<code>{escape(r.tags.get('code_version', 'not recorded'))}</code>",
             f"<code>{escape(r.tags.get('dataset_manifest_sha256', 'not recorded')[:16])}</code>",
             escape(r.tags.get("dataset", "–")), _when(r.run.info.start_time), _when(r.run.info.end_time)]
            for r in sweep.runs]
    versions = {r.tags.get("code_version") for r in sweep.runs}
    manifests = {r.tags.get("dataset_manifest_sha256") for r in sweep.runs}
    warn = ""
    if len(versions) > 1 or len(manifests) > 1:
        warn = ('<div class="warn">The runs do not share one code version and one dataset manifest: compare '
                'them with care.</div>')
    return warn + _table(["run", "status", "MLflow run", "code version", "dataset manifest (sha256)", "dataset",
                          "started", "ended"], rows, "provenance")


def _pictured_note(sweep: Sweep) -> str:
    drawn, encoders = {r.encoder for r in sweep.pictured}, sweep.encoders
    if len(drawn) >= len(encoders):
        return ""
    return (f'<p class="meta">The figures, sample grids and loss curves draw the first {len(drawn)} of '
            f"{len(encoders)} encoders by name (report option <code>pictured</code>); the tables hold every run, and "
            "every run's grids are in its MLflow artifacts under <code>samples/</code>.</p>")


def render(sweep: Sweep, figures: dict[str, bytes], link: str) -> str:
    p = sweep.parent
    finished = sum(r.status == "FINISHED" for r in sweep.runs)
    expected = finished + sum(1 for r in sweep.runs if r.problem()) + len(sweep.missing)
    title = f"rcdm sweep {p.data.tags.get('sweep_id', '?')} ({sweep.experiment})"
    fig = {k: _img(v, k) for k, v in figures.items()}
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">{finished}/{expected} jobs finished · parent MLflow run <code>{escape(p.info.run_id)}'
        f"</code> ({escape(p.info.status)}) · <code>{escape(' '.join(sweep.overrides)) or 'no overrides'}</code> · "
        f"tracking "
        f"<code>{escape(scrub(sweep.tracking_uri))}</code> · {escape(link)} · report written "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}</p>",
        _pictured_note(sweep),
        problems_section(sweep),
        "<h2>Faithfulness and conditioning, encoder × level</h2>", results_table(sweep),
        fig.get("faithfulness.png", ""), fig.get("conditioning.png", ""),
        "<h2>What the samples keep, factor by factor</h2>", factor_table(sweep), fig.get("factors.png", ""),
        "<h2>Embedding invariance per augmentation</h2>", invariance_table(sweep),
        "<h2>Samples</h2>", grids_section(sweep),
        "<h2>Loss curves</h2>", fig.get("loss.png", "<p>no loss logged</p>"),
        "<h2>Where the time went</h2>", timing_table(sweep),
        "<h2>Config differences between runs</h2>", config_differences(sweep),
        "<h2>Code and data</h2>", provenance_table(sweep),
    ]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
