"""What an encoder's embedding levels keep: for every level and labelled factor, a linear probe and a k-nearest-
neighbour vote trained on labelled images and read on others (Wilson 95 % intervals over the test images), the
embedding invariance index per SSL augmentation (bootstrap 95 % interval over images), and what training the
encoder cost. ``launch/retention.py`` runs it on any encoder rcdm loads (the demo's tiny ones, the released
ResNet-50s and ViTs): on the demo generator's images the factors are known (shape, colour, background, scale,
position, grayscale); on a folder of class sub-folders the label is the sub-folder.

The paper's findings 1 and 2 in embedding space: the backbone keeps what the augmentations vary (colour, and
the object), the projector drops colour and keeps the object.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from rcdm import synthetic
from rcdm.analysis.factor_reads import knn_predict
from rcdm.analysis.images import SYNTHETIC_SEED, SYNTHETIC_SPLIT
from rcdm.analysis.invariance import FAMILIES, augment, embed, embedding_invariance
from rcdm.device import pick_device
from rcdm.encoders import build_encoder
from rcdm.encoders import zoo
from rcdm.errors import UserError
from rcdm.preprocess import IMAGE_SUFFIXES, load_rgb, to_uint8_tensor
from rcdm.probes import factor_labels, fit_linear_probe
from rcdm.stats import Estimate, mean_ci, wilson

LABEL = "label"  # the one factor of a folder of class sub-folders


@dataclass
class RetentionConfig:
    """``configs/retention.yaml``: which encoders, on which labelled images, how many."""

    encoders: list[str] = field(default_factory=lambda: ["vicreg", "dino", "barlow", "simclr"])
    arch: str = "tiny"  # tiny (the demo's) | resnet50; a ViT encoder brings its own
    weights: str = "released"  # released | random | a file in the method's release layout (one encoder)
    images: str = "synthetic"  # synthetic (the demo generator's analysis split) | a folder of class sub-folders
    train_images: int = 2048  # the probes' and the k-NN vote's labelled images
    test_images: int = 512  # the images they are read on
    k: int = 10
    invariance_images: int = 256  # 0 = no invariance index
    bootstrap: int = 1000  # resamples of the invariance index's interval
    seed: int = 0
    device: str = "auto"
    output: str = "benchmarks/results/retention.json"
    markdown: str | None = None  # also the table as Markdown (docs/encoders.md quotes it)
    ship_from: str | None = None  # a folder of newly pretrained tiny encoders to swap into rcdm (ship_tiny)
    ship_earlier: str = "v1"  # the tiny_weights/ folder the replaced encoders move to

    def __post_init__(self):
        for key in ("train_images", "test_images", "k"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}={getattr(self, key)} must be at least 1")
        if self.invariance_images < 0 or self.bootstrap < 1:
            raise UserError("invariance_images must be >= 0 and bootstrap >= 1")
        if not self.encoders:
            raise UserError("encoders=[] names no encoder; give encoders=[vicreg,dino,...]")


@dataclass
class Labelled:
    """Images [N, 3, S, S] uint8 at the encoder's input size and their labels: {factor: (classes [N], mask [N])}."""

    images: torch.Tensor
    labels: dict[str, tuple[torch.Tensor, torch.Tensor]]
    source: str


def synthetic_labelled(count: int, size: int) -> Labelled:
    """The demo generator's held-out ``analysis`` split (no encoder, RCDM or reader trained on it)."""
    pairs = [synthetic.sample(SYNTHETIC_SEED, SYNTHETIC_SPLIT, i, size) for i in range(count)]
    images = torch.stack([to_uint8_tensor(img) for img, _ in pairs])
    return Labelled(images, factor_labels([f for _, f in pairs]),
                    f"the demo generator's {SYNTHETIC_SPLIT!r} split (seed {SYNTHETIC_SEED}), images 0-{count - 1}")


def folder_labelled(folder: str, count: int, preprocess) -> Labelled:
    """Up to ``count`` images of ``folder``'s class sub-folders (label = sub-folder, sorted by name), taken in a
    fixed order that interleaves the classes, prepared by the encoder's own preprocessing."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"images={folder}: not a folder; give images=synthetic or a folder of class sub-folders")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {c.name: sorted(f for f in c.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
             for c in classes}
    files = {k: v for k, v in files.items() if v}
    if len(files) < 2:
        raise UserError(f"images={folder} needs labels: retention probes what a level keeps of labelled factors, and "
                        f"this folder has {len(files)} class sub-folder(s) with images; give a folder of class "
                        f"sub-folders (the ImageNet layout: <folder>/<class>/<image>), or images=synthetic")
    order = sorted(((hashlib.sha256(str(f).encode()).hexdigest(), i, f) for i, (name, fs) in
                    enumerate(sorted(files.items())) for f in fs))  # a fixed shuffle: classes interleave
    order = order[:count]
    images = torch.stack([preprocess.crop_uint8(load_rgb(f)) for _, _, f in order])
    y = torch.tensor([i for _, i, _ in order])
    return Labelled(images, {LABEL: (y, torch.ones(len(y), dtype=torch.bool))},
                    f"{len(order)} images of {folder} ({len(files)} classes: its sub-folders)")


def _estimate(hits: int, n: int) -> dict:
    lo, hi = wilson(hits, n)
    return {"value": hits / n, "ci95": [lo, hi], "n": n}


def level_retention(feats: torch.Tensor, labels: dict, n_train: int, k: int) -> dict[str, dict]:
    """{factor: {"probe": estimate, "knn": estimate, "chance"}} for one level's embeddings [N, D]: the first
    ``n_train`` rows train, the rest test."""
    out = {}
    for name, (y, mask) in labels.items():
        idx = torch.nonzero(mask).flatten()
        tr, te = idx[idx < n_train], idx[idx >= n_train]
        if len(tr) < 2 or len(te) < 1 or len(torch.unique(y[tr])) < 2:
            continue
        classes = int(y[mask].max()) + 1
        mean, std, w, b = fit_linear_probe(feats[tr], y[tr], classes=classes)
        probe_hits = int(((((feats[te] - mean) / std) @ w + b).argmax(1) == y[te]).sum())
        knn_hits = int((knn_predict(feats[tr], y[tr], feats[te], k) == y[te]).sum())
        out[name] = {"probe": _estimate(probe_hits, len(te)), "knn": _estimate(knn_hits, len(te)),
                     "chance": 1.0 / len(torch.unique(y[mask]))}
    return out


def invariance_indices(encoder, images: torch.Tensor, cfg: RetentionConfig) -> dict:
    """{family: {level: {"value", "ci95"}}}: the invariance index of each level to each SSL augmentation family
    (rcdm.analysis.invariance), with a bootstrap interval over the images."""
    x = images[:cfg.invariance_images].float() / 255
    g = torch.Generator().manual_seed(cfg.seed)
    clean = embed(encoder, x)
    out = {}
    for family in FAMILIES:
        view = embed(encoder, augment(family, x, g))
        summary = embedding_invariance(clean, {family: view})
        out[family] = {}
        for level, h in clean.items():
            other = summary["cosine_other"][level]
            per = (torch.nn.functional.cosine_similarity(h, view[level], dim=1) - other) / max(1 - other, 1e-8)
            out[family][level] = {"value": summary[family][level]["invariance_index"],
                                  "ci95": mean_ci(per, cfg.bootstrap, cfg.seed)[1]}
    return out


def cost_of(record: dict) -> dict:
    """What a pretraining record says training the encoder cost: steps, wall and CPU seconds, device, data."""
    c = record.get("config", {})
    method = c.get("method") if isinstance(c.get("method"), dict) else c  # records before MethodConfig: flat
    return {"steps": record.get("steps"), "seconds": record.get("seconds"), "cpu_seconds": record.get("cpu_seconds"),
            "device": record.get("device", "not recorded"), "batch_size": c.get("batch_size"),
            "images": c.get("images"), "jitter": (method.get("augment") or {}).get("jitter"),
            "sha256": record.get("sha256")}


def training_cost(name: str, arch: str, weights: str) -> dict:
    """What training the encoder cost, where rcdm trained it (the tiny encoders' records); else where it came from."""
    if arch == "tiny" and weights == "released":
        return cost_of(json.loads((zoo.TINY_WEIGHTS / f"{name}.json").read_text()))
    if weights == "released":
        return {"source": f"the method's published {arch} weights (not trained by rcdm)"}
    return {"source": weights}


def retention(cfg: RetentionConfig) -> dict:
    """The table for every encoder of ``cfg``: -> the JSON written to ``cfg.output``."""
    device = pick_device(cfg.device)
    n = cfg.train_images + cfg.test_images
    out = {"config": asdict(cfg), "encoders": {}}
    for name in cfg.encoders:
        encoder = build_encoder(name, cfg.arch, cfg.weights).to(device)
        pre = encoder.preprocess
        data = synthetic_labelled(n, pre.size) if cfg.images == "synthetic" else folder_labelled(cfg.images, n, pre)
        if len(data.images) <= cfg.train_images:
            raise UserError(f"{data.source}: {len(data.images)} images, not more than train_images="
                            f"{cfg.train_images}: lower train_images so that some are left to test on")
        feats = {k: v.cpu() for k, v in embed_for(encoder, data.images).items()}
        levels = {level: level_retention(f, data.labels, cfg.train_images, cfg.k) for level, f in feats.items()}
        out["encoders"][name] = {
            "arch": encoder.arch, "weights": str(encoder.weights), "dims": dict(encoder.dims), "images": data.source,
            "train_images": cfg.train_images, "test_images": len(data.images) - cfg.train_images,
            "levels": levels, "training": training_cost(name, cfg.arch, cfg.weights),
            "invariance": invariance_indices(encoder, data.images, cfg) if cfg.invariance_images else None}
    return out


def embed_for(encoder, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{level: [N, D]} of uint8 images already at the encoder's input size."""
    from rcdm.encoders import embed_in_chunks

    return embed_in_chunks(encoder, images, encoder.preprocess.normalize_uint8)


def fmt(e: dict) -> str:
    return Estimate(e["value"], tuple(e["ci95"])).format(2)


def markdown(table: dict) -> str:
    """The retention table as Markdown: one row per encoder and level; per factor the linear probe, then the k-NN
    vote, each with its 95 % interval; then the invariance index per augmentation."""
    lines = []
    factors = list(dict.fromkeys(f for e in table["encoders"].values() for lv in e["levels"].values() for f in lv))
    head = ["encoder", "level", *(f"{f} probe / {table['config']['k']}-NN" for f in factors)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in table["encoders"].items():
        for level, row in e["levels"].items():
            cells = [f"{fmt(row[f]['probe'])} / {fmt(row[f]['knn'])}" if f in row else "–" for f in factors]
            lines.append(f"| {name} | {level} | " + " | ".join(cells) + " |")
    chance = {f: lv[f]["chance"] for e in table["encoders"].values() for lv in e["levels"].values() for f in lv}
    lines.append("")
    lines.append("Chance: " + ", ".join(f"{f} {c:.2f}" for f, c in chance.items()) + ".")
    inv = [(n, e) for n, e in table["encoders"].items() if e.get("invariance")]
    if inv:
        fams = list(next(iter(inv))[1]["invariance"])
        lines += ["", "| encoder | level | " + " | ".join(fams) + " |", "|" + "---|" * (len(fams) + 2)]
        for name, e in inv:
            for level in e["levels"]:
                lines.append(f"| {name} | {level} | " + " | ".join(fmt(e["invariance"][f][level]) for f in fams) + " |")
    demo = [(n, e) for n, e in table["encoders"].items() if e.get("arch") == "tiny" and "shape" in
            e["levels"].get("backbone", {})]
    if demo:  # the demo encoders' goals, read on the k-NN vote and the probe
        lines += ["", "| encoder | goal | k-NN | probe |", "|---|---|---|---|"]
        for name, e in demo:
            for g in goals(e):
                cells = [f"{fmt(g[h])} {'met' if g[h]['met'] else 'missed'}" if g[h] else "–" for h in ("knn", "probe")]
                lines.append(f"| {name} | {g['level']} {g['factor']} {g['goal']} | " + " | ".join(cells) + " |")
    cost = [(n, e["training"]) for n, e in table["encoders"].items()]
    lines += ["", "| encoder | trained | steps | wall seconds | CPU seconds | device |", "|---|---|---|---|---|---|"]
    for name, t in cost:
        if "steps" in t:
            what = (f"{t['images']} images, batch {t.get('batch_size')}, jitter {t.get('jitter')}" if t.get("images")
                    else f"sha256 {str(t.get('sha256'))[:12]}...")
            lines.append(f"| {name} | {what} | {t['steps']} | {t.get('seconds')} | {t.get('cpu_seconds') or '–'} | "
                         f"{t.get('device')} |")
        else:
            lines.append(f"| {name} | {t['source']} | – | – | – | – |")
    return "\n".join(lines) + "\n"


# The demo encoders' goals (the paper's findings 1 and 2 at the demo's scale): level -> factor -> (op, bound)
DEMO_GOALS = {"backbone": {"shape": (">=", 0.9), "colour": (">=", 0.8)},
              "projector": {"shape": (">=", 0.85), "colour": ("<=", 0.5)}}


def goals(entry: dict, wanted: dict = DEMO_GOALS) -> list[dict]:
    """Each goal of ``wanted`` read on one encoder's table entry: the k-NN vote's and the probe's estimate with
    its interval, and whether each meets the bound (on the estimate itself)."""
    out = []
    for level, factors in wanted.items():
        for factor, (op, bound) in factors.items():
            row = entry["levels"].get(level, {}).get(factor)
            got = {}
            for how in ("knn", "probe"):
                e = (row or {}).get(how)
                got[how] = None if e is None else {**e, "met": e["value"] >= bound if op == ">=" else e["value"] <= bound}
            out.append({"level": level, "factor": factor, "goal": f"{op} {bound}", **got})
    return out


def ship_tiny(cfg: RetentionConfig) -> dict:
    """Swap the tiny encoders pretrained into ``cfg.ship_from`` (``<method>.pt`` beside its pretraining record
    ``<method>.json``) into rcdm/encoders/tiny_weights/: each record gains its retention numbers and goals, and the
    files it replaces move to ``tiny_weights/<cfg.ship_earlier>/`` (a folder ``zoo.EARLIER_TINY`` names), where the
    datasets and models made with them still find them by sha256. Everything is checked before anything moves.
    -> the retention table of the shipped encoders."""
    from rcdm.encoders.weights import sha256sum
    from rcdm.storage import write_local

    staged, earlier = Path(cfg.ship_from), cfg.ship_earlier
    if earlier not in zoo.EARLIER_TINY:
        raise UserError(f"ship_earlier={earlier}: rcdm/encoders/zoo.py's EARLIER_TINY does not name that folder, so "
                        f"what was made with the encoders it replaces would stop loading; add it there first")
    plan = []
    for name in cfg.encoders:
        pt, rec_path = staged / f"{name}.pt", staged / f"{name}.json"
        if not pt.is_file() or not rec_path.is_file():
            raise UserError(f"ship_from={staged}: no {name}.pt with its record {name}.json (launch/pretrain_encoder.py "
                            f"writes both)")
        try:
            record = json.loads(rec_path.read_text())
        except ValueError:
            raise UserError(f"{rec_path} is not a pretraining record (JSON)") from None
        if not isinstance(record, dict) or record.get("method") != name or record.get("arch") != "tiny":
            raise UserError(f"{rec_path} is not the record of a tiny {name} encoder")
        if sha256sum(pt) != record.get("sha256"):
            raise UserError(f"{pt} does not match the sha256 in {rec_path.name}: not the file that run wrote")
        old = zoo.TINY_WEIGHTS / f"{name}.pt"
        aside = zoo.TINY_WEIGHTS / earlier / f"{name}.pt"
        if old.exists() and aside.exists() and sha256sum(aside) != sha256sum(old):
            raise UserError(f"{aside} holds another earlier {name} encoder; choose a new ship_earlier folder")
        plan.append((name, pt, record))
    shipped = {"config": asdict(cfg), "encoders": {}}
    for name, pt, record in plan:
        entry = retention(replace(cfg, encoders=[name], weights=str(pt), ship_from=None))["encoders"][name]
        record["retention"] = {"images": entry["images"], "train_images": entry["train_images"],
                               "test_images": entry["test_images"], "k": cfg.k, "levels": entry["levels"],
                               "invariance": entry["invariance"], "goals": goals(entry)}
        entry["training"] = cost_of(record)
        shipped["encoders"][name] = entry
    for name, pt, record in plan:
        old, old_rec = zoo.TINY_WEIGHTS / f"{name}.pt", zoo.TINY_WEIGHTS / f"{name}.json"
        if old.exists():
            (zoo.TINY_WEIGHTS / earlier).mkdir(exist_ok=True)
            for f in (old, old_rec):
                if f.exists():
                    os.replace(f, zoo.TINY_WEIGHTS / earlier / f.name)
        write_local(zoo.TINY_WEIGHTS / f"{name}.pt", pt.read_bytes())
        write_local(old_rec, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return shipped
