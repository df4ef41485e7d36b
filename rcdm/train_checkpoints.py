"""Full-state training checkpoints under a run root URL (local path or s3://).

``<run root>/checkpoints/ckpt-<step>.pt`` holds everything a job needs to continue exactly: model, EMA,
optimizer, step, RNG states, the resolved config, the MLflow run id and what the model is conditioned
on. Each file is written atomically; ``latest.json`` is then replaced atomically to point at it, so a
reader finds the newest complete checkpoint without listing or parsing file names.
"""
from __future__ import annotations

import logging
import random

import numpy as np
import torch

from rcdm import safe_load
from rcdm.storage import StorageOptions, atomic_open, join, open_fs, read_json, write_json

log = logging.getLogger(__name__)
FORMAT = "rcdm"
VERSION = 1
LATEST = "latest.json"


def rng_state() -> dict:
    """The process's RNG states as tensors and plain containers (checkpoints load with weights_only=True)."""
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # checkpoints of rcdm before 0.2 pickled numpy's tuple
        np.random.set_state(n)
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_root: str, state: dict, storage: StorageOptions | None = None, keep: int = 2) -> str:
    """Write ``state`` (which must hold ``step``) as the newest checkpoint; keep the ``keep`` newest."""
    fs, root = open_fs(run_root, storage)
    ckpt_dir = join(root, "checkpoints")
    name = f"ckpt-{state['step']:09d}.pt"
    with atomic_open(fs, join(ckpt_dir, name)) as f:  # streamed: no second copy of a multi-GB state in memory
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)
    previous = read_json(fs, join(ckpt_dir, LATEST)).get("history", []) if fs.exists(join(ckpt_dir, LATEST)) else []
    history = [h for h in previous if h != name] + [name]
    write_json(fs, join(ckpt_dir, LATEST), {"file": name, "step": state["step"], "history": history[-keep:]})
    for old in history[:-keep]:  # only after the pointer has moved on
        if fs.exists(join(ckpt_dir, old)):
            fs.rm(join(ckpt_dir, old))
    log.info("checkpoint %s (step %d)", join(run_root, "checkpoints", name), state["step"])
    return join(run_root, "checkpoints", name)


def latest_path(run_root: str, storage: StorageOptions | None = None) -> str | None:
    """URL of the newest complete checkpoint under ``run_root``, or None."""
    fs, root = open_fs(run_root, storage)
    pointer = join(root, "checkpoints", LATEST)
    if not fs.exists(pointer):
        return None
    return join(run_root, "checkpoints", read_json(fs, pointer)["file"])


def load(url: str, storage: StorageOptions | None = None) -> dict:
    """A checkpoint as saved (tensors on CPU), read with weights_only=True (rcdm.safe_load): a file that
    needs anything else is refused, not unpickled."""
    fs, path = open_fs(url, storage)
    with fs.open(path, "rb") as f:
        state = safe_load.load(f.read(), url)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{url} is not an rcdm training checkpoint")
    return state
