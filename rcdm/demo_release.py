"""The demo RCDMs that ship with rcdm (``rcdm/demo_models/``): one tiny RCDM per demo encoder and level,
trained on the embedded demo from one shared decoder, far past the sweep's budget (``configs/demo_release.yaml``).

Each model is two files: ``<encoder>-<level>.pt``, the EMA weights as float16 tensors (a plain state dict,
read with ``torch.load(weights_only=True)``: nothing is unpickled), and ``<encoder>-<level>.json``, its
record: the sha256 of the weights file (checked at every load), what sampling needs (preset, UNet options,
process, encoder and its exact preprocessing), and how it was made (recipe, steps, batch, data and encoder
digests, device, seconds, the final faithfulness with its interval, the conditioning gains and what the
samples keep, factor by factor, against the embedding's bound).

Anywhere a checkpoint is taken, ``demo:<encoder>-<level>`` names one (``checkpoint=demo:vicreg-backbone``).
``export`` writes them from the training runs of ``configs/demo_release.yaml``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rcdm import safe_load, train_checkpoints
from rcdm.encoders.weights import sha256sum
from rcdm.errors import UserError
from rcdm.manifest import read_manifest
from rcdm.model_card import LoadedRCDM, ModelCard
from rcdm.storage import atomic_open, join, open_fs, read_json

DEMO_DIR = Path(__file__).parent / "demo_models"
PREFIX = "demo:"
NAME = re.compile(r"^(?P<encoder>[a-z0-9]+)-(?P<level>backbone|projector)$")
RECORD_FORMAT = 1


@dataclass
class ExportConfig:
    """``launch/export_demo.py``'s schema (``configs/export_demo.yaml``)."""
    runs: list[str] = field(default_factory=list)  # run roots, or folders holding them (a sweep's runs)
    out: str | None = None  # where the .pt/.json pairs go; null: rcdm/demo_models
    device: str | None = None  # the hardware that trained the runs, for runs whose checkpoint does not record it
    held_out: int = 256  # images of the analysis split the exported file's factors are read on (0: none)
    read: list[str] = field(default_factory=list)  # no export: re-read these models of `out` (vicreg-backbone ...)


def is_demo_ref(ref) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


_READ_FROM: list[Path] = []  # models_from's folders, innermost last


def demo_dir() -> Path:
    """Where ``demo:<name>`` resolves: the folder of an enclosing ``models_from``, else ``$RCDM_DEMO_MODELS`` if set
    (another set of demo models, e.g. a retrained one), else the shipped ones."""
    if _READ_FROM:
        return _READ_FROM[-1]
    return Path(os.environ.get("RCDM_DEMO_MODELS") or DEMO_DIR)


@contextmanager
def models_from(directory: str | Path):
    """``demo:<name>`` resolves to ``directory``'s files inside the block (this process only; the environment
    is left alone)."""
    _READ_FROM.append(Path(directory))
    try:
        yield
    finally:
        _READ_FROM.pop()


def available(directory: Path | None = None) -> list[str]:
    """The demo models' names (``vicreg-backbone``, ...)."""
    directory = directory or demo_dir()
    return sorted(p.stem for p in directory.glob("*.json") if NAME.match(p.stem))


def record(name: str, directory: Path | None = None) -> DemoRecord:
    """The record of demo model ``name`` (``vicreg-backbone`` or ``demo:vicreg-backbone``)."""
    directory = directory or demo_dir()
    name = name.removeprefix(PREFIX)
    path = directory / f"{name}.json"
    if not NAME.match(name) or not path.exists():
        have = ", ".join(PREFIX + n for n in available(directory)) or "none (rcdm/demo_models/ is empty)"
        raise UserError(f"no demo model {PREFIX}{name}; the shipped ones are: {have}")
    try:
        rec = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        rec = None
    if not isinstance(rec, dict):
        raise UserError(f"{path} is not a demo model record (not a JSON object); restore it with git checkout -- "
                        f"rcdm/demo_models")
    return DemoRecord.from_dict(rec, str(path))


def _card_of(rec: dict, where: str = "a demo record") -> ModelCard:
    """The model card of a demo record (records before cards kept its parts under ``model`` and ``encoder``)."""
    if "card" in rec:
        return ModelCard.from_dict(rec["card"], where)
    try:
        m, enc = rec["model"], rec["encoder"]
    except (KeyError, TypeError):
        raise UserError(f"{where} holds no model card") from None
    return ModelCard.from_dict({"preset": m["preset"], "embed_dim": m["embed_dim"], "image_size": m["image_size"],
                                "unet": m["unet"], "process": m["process"], "encoder": enc["name"],
                                "level": enc["level"], "encoder_arch": enc["arch"], "encoder_weights": enc["weights"],
                                "preprocess": enc["preprocess"], "recipe": rec.get("training", {}).get("recipe"),
                                "device": rec.get("training", {}).get("device")})


def load_demo(ref: str, directory: Path | None = None) -> LoadedRCDM:
    """``demo:<encoder>-<level>`` -> a ``LoadedRCDM`` (float32 weights), after checking the file's sha256."""
    directory = directory or demo_dir()
    name = ref.removeprefix(PREFIX)
    rec = record(name, directory)
    if rec.weights_file != f"{name}.pt":
        raise UserError(f"{directory / name}.json names weights file {rec.weights_file[:80]!r} (a demo "
                        f"record names its own, {name}.pt, with its sha256): the record was altered; restore it with "
                        f"git checkout -- rcdm/demo_models")
    path = directory / rec.weights_file
    if not path.exists():
        raise UserError(f"{path} is missing (the record {name}.json is there): restore rcdm/demo_models/ from "
                        f"the repository (git checkout -- rcdm/demo_models) or reinstall rcdm")
    digest = sha256sum(path)
    if digest != rec.sha256:
        raise UserError(f"{path} does not match the sha256 in {name}.json ({digest} != {rec.sha256}): the file "
                        f"is damaged or was replaced; restore it with git checkout -- rcdm/demo_models")
    state = safe_load.load(path)
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a state dict of tensors: restore it with git checkout -- rcdm/demo_models")
    model = rec.card.build_for({k: v.float() if isinstance(v, torch.Tensor) else v for k, v in state.items()},
                               str(path))
    t = rec.training
    return LoadedRCDM(model.eval(), rec.card, f"{PREFIX}{name} ({path})",
                      {"steps": t.steps, "train_seconds": t.train_seconds, "sha256": rec.sha256, "device": t.device})


@dataclass
class DemoTraining:
    """How a demo model was made. ``steps`` and ``train_seconds`` include the model it continued from
    (``continued_from``: the start record of ``train.init_from`` with this run's own share); ``run_cpu_seconds``
    is this run's training process alone."""
    steps: int
    batch_size: int
    lr: float
    lr_schedule: str
    ema_decay: float
    seed: int
    device: str
    train_seconds: float
    run: dict  # experiment, sweep_id, job_name: which run
    data: dict  # the split's URL, count, source and the sha256 of its images and embeddings
    continued_from: dict | None = None
    run_cpu_seconds: float | None = None

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("steps", "batch_size", "lr", "lr_schedule", "ema_decay", "seed",
                                           "device", "train_seconds")}
        d.update({k: v for k, v in (("continued_from", self.continued_from),
                                    ("run_cpu_seconds", self.run_cpu_seconds)) if v is not None})
        return {**d, "run": self.run, "data": self.data}


@dataclass
class DemoRecord:
    """``<encoder>-<level>.json``: the record of one shipped demo model, read (``record``) and written
    (``write_record``) here alone. Its weights file is trusted for its tensors after its sha256 matches."""
    name: str
    weights_file: str
    sha256: str
    parameters: int
    card: ModelCard
    training: DemoTraining
    faithfulness: dict
    conditioning_gains: dict
    factor_reads: dict | None  # the run's end-of-run reads (64 validation images); None without factors
    evaluated_on: str
    factor_reads_held_out: dict | None = None  # the shipped file's reads on the analysis split (findings.py)
    format: int = RECORD_FORMAT
    dtype: str = "float16"
    weights: str = "EMA"

    def to_dict(self) -> dict:
        d = {"format": self.format, "name": self.name, "weights_file": self.weights_file, "sha256": self.sha256,
             "dtype": self.dtype, "weights": self.weights, "parameters": self.parameters,
             "card": self.card.to_dict(), "training": self.training.to_dict(), "faithfulness": self.faithfulness,
             "conditioning_gains": self.conditioning_gains, "factor_reads": self.factor_reads,
             "evaluated_on": self.evaluated_on}
        return {**d, **({"factor_reads_held_out": self.factor_reads_held_out}
                        if self.factor_reads_held_out is not None else {})}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "DemoRecord":
        def obj(v, what: str, empty_ok: bool = False):
            if not isinstance(v, dict) and not (empty_ok and v is None):
                raise TypeError(f"{what} is not an object")
            return v

        try:
            t = obj(d["training"], "training")
            training = DemoTraining(int(t["steps"]), int(t["batch_size"]), float(t["lr"]), str(t["lr_schedule"]),
                                    float(t["ema_decay"]), int(t["seed"]), str(t["device"]),
                                    float(t["train_seconds"]), obj(t.get("run", {}), "training.run"),
                                    obj(t.get("data", {}), "training.data"),
                                    obj(t.get("continued_from"), "training.continued_from", True),
                                    t.get("run_cpu_seconds"))
            rec = cls(str(d["name"]), str(d["weights_file"]), str(d["sha256"]), int(d["parameters"]),
                      _card_of(d, where), training, obj(d["faithfulness"], "faithfulness"),
                      obj(d["conditioning_gains"], "conditioning_gains"),
                      obj(d.get("factor_reads"), "factor_reads", True), str(d.get("evaluated_on", "")),
                      obj(d.get("factor_reads_held_out"), "factor_reads_held_out", True),
                      int(d.get("format", RECORD_FORMAT)), str(d.get("dtype", "float16")),
                      str(d.get("weights", "EMA")))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where} is not a demo model record ({type(e).__name__}: {str(e)[:120]}); restore it "
                            f"with git checkout -- rcdm/demo_models") from None
        return rec


def write_record(directory: Path, rec: DemoRecord) -> None:
    write_atomic(Path(directory) / f"{rec.name}.json", (json.dumps(rec.to_dict(), indent=2) + "\n").encode())


def _data_digest(url: str, split: str, encoder: str, storage) -> dict:
    """sha256 over the (name, sha256) of every shard of ``split``: the images and ``encoder``'s embeddings."""
    manifest = read_manifest(url, storage)
    if manifest is None or split not in manifest.splits:
        raise UserError(f"{url} has no {split} split: export on the machine that trained the demo models")
    if encoder not in manifest.encoders:  # the name comes from the run's card: never a folder the manifest lacks
        raise UserError(f"{url} holds no embeddings of encoder {encoder!r} (it has {sorted(manifest.encoders)}): the "
                        f"run's card and its dataset disagree; nothing was written")
    fs, root = open_fs(url, storage)
    out = {"url": url, "split": split, "count": manifest.splits[split].count,
           "source": manifest.splits[split].source}
    for part in ("images", encoder):
        h = hashlib.sha256()
        for shard in manifest.splits[split].shard_names():
            with fs.open(join(root, part, shard), "rb") as f:
                h.update(f"{shard} {hashlib.sha256(f.read()).hexdigest()}\n".encode())
        out[f"{'images' if part == 'images' else 'embeddings'}_sha256"] = h.hexdigest()
    return out


def export(run_root: str, directory: Path = DEMO_DIR, device: str | None = None, storage=None) -> DemoRecord:
    """Write ``<encoder>-<level>.pt`` (float16 EMA weights) and its JSON record from a finished training run
    (one of ``configs/demo_release.yaml``, or another run of the same data, such as a kept arm of
    ``benchmarks/convergence.py --work``; the record names the run); returns the record."""
    url = train_checkpoints.latest_path(run_root, storage)
    if url is None:
        raise UserError(f"{run_root} holds no checkpoint (no checkpoints/latest.json)")
    state = train_checkpoints.load(url, storage)
    try:
        return _export(run_root, directory, device, storage, state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UserError(f"{run_root} is not what a finished rcdm run holds ({type(e).__name__}: {str(e)[:200]}) in its "
                        f"checkpoint or result files; nothing was written") from None


def _export(run_root: str, directory: Path, device: str | None, storage, state: dict) -> DemoRecord:
    card, cfg = ModelCard.from_dict(state["meta"]), state["config"]
    if state["step"] != cfg["train"]["steps"]:
        raise UserError(f"{run_root} stopped at step {state['step']} of {cfg['train']['steps']}: finish the run "
                        f"(start the same sweep command again) before exporting it")
    fs, root = open_fs(run_root, storage)
    results = {}
    for name in ("faithfulness.json", "conditioning.json"):
        if not fs.exists(join(root, name)):
            raise UserError(f"{run_root} has no {name}: the run's final evaluation did not complete")
        results[name] = read_json(fs, join(root, name))
    device = device or card.device
    if not device:
        raise UserError(f"{run_root}'s checkpoint does not say which device trained it (runs before rcdm recorded "
                        f"it): pass --device")
    card = card.with_device(device)
    name = f"{card.encoder.name}-{card.encoder.level}"
    if not NAME.match(name):  # the card is the run folder's word: it names files here, so it must be a name
        raise UserError(f"{run_root}'s checkpoint names its encoder and level {name!r}, which is not a demo model name "
                        f"(<encoder>-<backbone|projector>, lower-case letters and digits): it is not a demo run; "
                        f"nothing was written")
    buf = io.BytesIO()
    torch.save({k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in state["ema"].items()},
               buf)
    weights = directory / f"{name}.pt"
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    f = results["faithfulness.json"]
    t = cfg["train"]
    steps, seconds, start = state["step"], round(state["train_seconds"], 1), None
    begun = train_checkpoints.read_start(fs, root)  # continued from another model's weights (train.init_from)
    if begun:
        if begun.steps is None or begun.train_seconds is None:
            raise UserError(f"{run_root} started from {begun.source}, whose steps and seconds are not on "
                            f"record: a demo record needs both; start it from a demo model or an rcdm run instead")
        steps, seconds = steps + begun.steps, round(seconds + begun.train_seconds, 1)
        start = {**begun.to_dict(), "run_steps": state["step"], "run_train_seconds": round(state["train_seconds"], 1),
                 "how": begun.how}
    rec = DemoRecord(
        name, weights.name, digest, sum(v.numel() for v in state["ema"].values()), card,
        DemoTraining(steps, t["batch_size"], t["lr"], t["lr_schedule"], t["ema_decay"], t["seed"], device, seconds,
                     # which run: the release sweep's, or a benchmark's
                     {"experiment": cfg["tracking"]["experiment"], "sweep_id": cfg["sweep_id"],
                      "job_name": cfg["job_name"]},
                     _data_digest(cfg["data"]["url"], cfg["data"]["split"], card.encoder.name, storage), start,
                     # this run's training process CPU seconds (its threads; a source it started from not included)
                     round(state["train_cpu_seconds"], 1)
                     if isinstance(state.get("train_cpu_seconds"), (int, float)) else None),
        {k: f[k] for k in ("n", "mrr", "mrr_ci95", "top1", "top1_ci95", "mean_rank", "mean_rank_ci95", "cosine_own",
                           "chance", "split", "steps", "guidance")},
        results["conditioning.json"]["final"],
        # what its samples keep, factor by factor, against the originals and the embedding's k-NN bound
        shorten_factor_reads(fs, root),
        "the run's float32 EMA weights at its last step; launch/analyze.py re-measures the float16 files")
    # every refusal above comes before the first write: a refused export leaves --out as it was
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(weights, buf.getvalue())
    write_record(directory, rec)
    return rec


def shorten_factor_reads(fs, root: str) -> dict | None:
    """The run's end-of-run factor reads (``factor_reads.json``), shortened to each factor's numbers; None where
    its data records no generative factors."""
    path = join(root, "factor_reads.json")
    if not fs.exists(path):
        return None
    r = read_json(fs, path)
    keep = ("samples", "samples_ci95", "originals", "bound", "chance", "n")
    about = {k: r[k] for k in ("images", "split", "samples_per_image", "steps", "guidance", "bound") if k in r}
    return {**about, "factors": {k: {x: v[x] for x in keep if x in v} for k, v in r["factors"].items()}}


def write_atomic(path: Path, data: bytes) -> None:
    fs, p = open_fs(str(path))
    with atomic_open(fs, p) as f:
        f.write(data)
