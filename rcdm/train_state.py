"""A training run's state: what the loop advances and a checkpoint holds (``TrainState``), what training has cost
(``Spent``), and ``restore``, which loads the newest checkpoint of a run root back into it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rcdm import train_checkpoints
from rcdm.config import TrainConfig
from rcdm.errors import UserError
from rcdm.model_card import ModelCard
from rcdm.provenance import Spent
from rcdm.redaction import scrub_tree
from rcdm.storage import StorageOptions


def restore(run_root: str, storage: StorageOptions, model, ema, opt) -> tuple[int, dict | None, str | None]:
    """Load the newest checkpoint under ``run_root`` into model, EMA and optimizer; (step, state, url)."""
    url = train_checkpoints.latest_path(run_root, storage)
    if url is None:
        return 0, None, None
    state = train_checkpoints.load(url, storage)
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])  # no RNG state: every step reseeds (step_seed)
    except (RuntimeError, ValueError, KeyError) as e:
        was = state.get("meta", {})
        raise UserError(f"{url} was trained with another model or recipe (preset {was.get('preset')}, recipe "
                        f"{was.get('recipe', {}).get('name')}, {was.get('embed_dim')}-d conditioning) than this job "
                        f"asks for, so it cannot resume from it ({' '.join(str(e).split())[:200]}); give this job a "
                        f"new sweep_id, or the overrides that run had") from None
    return state["step"], state, url


@dataclass
class TrainState:
    """What the loop advances and a checkpoint holds: the weights, their EMA, the optimizer, the step, and what
    training has cost so far."""

    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    step: int = 0
    spent: Spent = field(default_factory=Spent)

    def checkpoint(self, cfg: TrainConfig, card: ModelCard, run_id: str | None) -> dict:
        return {"step": self.step, "train_seconds": self.spent.wall_s, "train_cpu_seconds": self.spent.cpu_s,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "config": scrub_tree(cfg.to_dict()), "mlflow_run_id": run_id, "meta": card.to_dict()}
