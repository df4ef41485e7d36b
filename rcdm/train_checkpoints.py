"""Full-state training checkpoints under a run root URL (local path or s3://).

``<run root>/checkpoints/ckpt-<step>.pt`` holds everything a job needs to continue exactly: model, EMA,
optimizer, step, the resolved config, the MLflow run id and what the model is conditioned on (no RNG
state: the batch and every random draw of a step are functions of the seed, rank and step). Each file is
written atomically; ``latest.json`` is then replaced atomically to point at it, so a reader finds the
newest complete checkpoint without listing or parsing file names.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field, fields

import torch

from rcdm import safe_load
from rcdm.errors import UserError
from rcdm.storage import StorageOptions, atomic_open, join, open_fs, read_json, write_json

log = logging.getLogger(__name__)
FORMAT = "rcdm"
VERSION = 1
LATEST = "latest.json"
INIT_FILE = "init_from.json"  # in the run root: the model train.init_from started the run from (rcdm.train)
NAME = re.compile(r"^ckpt-\d{9}\.pt$")  # the only files housekeeping ever deletes: ckpt-<step>.pt, no folder part


def _pointer(fs, ckpt_dir: str, run_root: str) -> dict | None:
    """``latest.json`` checked: it may only name checkpoint files of this folder (a pointer is someone else's
    file in a shared run folder or bucket, trusted for nothing else)."""
    path = join(ckpt_dir, LATEST)
    if not fs.exists(path):
        return None
    try:
        pointer = read_json(fs, path)
        names = [pointer["file"], *pointer.get("history", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{join(run_root, 'checkpoints', LATEST)} is not a checkpoint pointer; restore it, or "
                        f"delete it (the job then starts again from step 0), or start a new sweep_id") from None
    bad = [n for n in names if not (isinstance(n, str) and NAME.match(n))]
    if bad:
        raise UserError(f"{join(run_root, 'checkpoints', LATEST)} names {bad[0]!r}, which is not a checkpoint "
                        f"file of that folder (ckpt-<9 digits>.pt); it was altered: restore it, or delete it (the "
                        f"job then starts again from step 0), or start a new sweep_id")
    return pointer


def save(run_root: str, state: dict, storage: StorageOptions | None = None, keep: int = 2) -> str:
    """Write ``state`` (which must hold ``step``) as the newest checkpoint; keep the ``keep`` newest."""
    fs, root = open_fs(run_root, storage)
    ckpt_dir = join(root, "checkpoints")
    name = f"ckpt-{state['step']:09d}.pt"
    with atomic_open(fs, join(ckpt_dir, name)) as f:  # streamed: no second copy of a multi-GB state in memory
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)
    pointer = _pointer(fs, ckpt_dir, run_root)
    previous = pointer.get("history", []) if pointer else []
    history = [h for h in previous if h != name] + [name]
    write_json(fs, join(ckpt_dir, LATEST), {"file": name, "step": state["step"], "history": history[-keep:]})
    for old in history[:-keep]:  # only after the pointer has moved on
        if fs.exists(join(ckpt_dir, old)):
            fs.rm(join(ckpt_dir, old))
    log.info("checkpoint %s (step %d)", join(run_root, "checkpoints", name), state["step"])
    return join(run_root, "checkpoints", name)


def _latest(run_root: str, storage: StorageOptions | None) -> dict | None:
    fs, root = open_fs(run_root, storage)
    return _pointer(fs, join(root, "checkpoints"), run_root)


def latest_path(run_root: str, storage: StorageOptions | None = None) -> str | None:
    """URL of the newest complete checkpoint under ``run_root``, or None."""
    pointer = _latest(run_root, storage)
    return join(run_root, "checkpoints", pointer["file"]) if pointer else None


def latest_step(run_root: str, storage: StorageOptions | None = None) -> int:
    """The step of the newest complete checkpoint under ``run_root``; 0 where it has none."""
    pointer = _latest(run_root, storage)
    return int(pointer["step"]) if pointer else 0


def load(url: str, storage: StorageOptions | None = None) -> dict:
    """A checkpoint as saved (tensors on CPU), read with weights_only=True (rcdm.safe_load): a file that
    needs anything else is refused, not unpickled."""
    fs, path = open_fs(url, storage)
    with fs.open(path, "rb") as f:
        state = safe_load.load(f.read(), url)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{url} is not an rcdm training checkpoint")
    return state


# init_from.json: how a run started (rcdm.warm_start writes it through here, rcdm.demo_release reads it)
HOW = {"all": "this run's online and EMA weights started from the source's EMA weights; its optimizer and EMA "
              "warm-up started afresh",
       "decoder": "this run's decoder started from the source's EMA weights, all but the conditioning input, which "
                  "it learned from zero for its own encoder; its optimizer and EMA warm-up started afresh"}


@dataclass(frozen=True)
class StartRecord:
    """``init_from.json`` in a run root: the model a run started from (train.init_from). Written by the run's first
    start, read by export (rcdm.demo_release); both go through here. ``training`` is the source's own training
    record where it has one (a demo model's record, a run's checkpoint), kept as it was."""

    source: str  # what train.init_from said
    loaded: str  # the file it resolved to
    parts: str = "all"  # all | decoder (train.init_parts)
    steps: int | None = None  # the source's training steps and seconds, where on record
    train_seconds: float | None = None
    device: str | None = None
    source_encoder: str | None = None  # "<encoder> <level>" of the source (a decoder start's differs)
    training: dict = field(default_factory=dict)

    @property
    def how(self) -> str:
        return HOW[self.parts]

    def to_dict(self) -> dict:
        out = {**self.training, **{k: v for k, v in asdict(self).items() if k != "training"}}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, d, where: str) -> StartRecord:
        """A record read from a run folder: its fields type-checked, one error naming the file otherwise."""
        def bad(why: str) -> UserError:
            return UserError(f"{where} is not a start record rcdm wrote ({why}); delete it if the run did not start "
                             f"from another model")

        if not isinstance(d, dict) or not isinstance(d.get("source"), str):
            raise bad("no source")
        steps, seconds = d.get("steps"), d.get("train_seconds")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
            raise bad(f"steps {steps!r}")
        if seconds is not None and (not isinstance(seconds, (int, float)) or isinstance(seconds, bool)
                                    or not 0 <= seconds < float("inf")):
            raise bad(f"train_seconds {seconds!r}")
        parts = d.get("parts", "all")
        if parts not in HOW:
            raise bad(f"parts {parts!r}")
        text = {k: d.get(k) for k in ("loaded", "device", "source_encoder")}
        if any(v is not None and not isinstance(v, str) for v in text.values()):
            raise bad("a text field that is not text")
        known = {f.name for f in fields(cls)}
        return cls(d["source"], text["loaded"] or d["source"], parts, steps, seconds, text["device"],
                   text["source_encoder"], {k: v for k, v in d.items() if k not in known})


def write_start(fs, root: str, record: StartRecord) -> None:
    write_json(fs, join(root, INIT_FILE), record.to_dict())


def read_start(fs, root: str) -> StartRecord | None:
    """The run's start record, None where it started from scratch."""
    path = join(root, INIT_FILE)
    if not fs.exists(path):
        return None
    try:
        d = read_json(fs, path)
    except ValueError as e:
        raise UserError(f"{path} is not JSON ({e})") from None
    return StartRecord.from_dict(d, path)
