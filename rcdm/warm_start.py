"""``train.init_from``: a run that starts from another trained RCDM's weights (a shipped demo model, a run, a file),
refused unless that model is the same kind as the one the job trains."""
from __future__ import annotations

import logging
from dataclasses import asdict

from rcdm.config import TrainConfig
from rcdm.data import DatasetInfo
from rcdm.errors import UserError

log = logging.getLogger("rcdm.train")


def warm_start(ref: str, cfg: TrainConfig, info: DatasetInfo, unet_cfg, model, ema) -> dict:
    """Copy a trained RCDM's EMA weights (its embedding statistics included: its weights were trained on them)
    into ``model`` and ``ema``; refused unless it is the same UNet, for the same encoder weights and level.
    Returns what the run records about its start (``init_from.json``): the source, its digest, its training."""
    from rcdm.model_files import load_checkpoint

    try:
        loaded = load_checkpoint(ref, download=False, storage=cfg.storage)
    except UserError as e:
        raise UserError(f"train.init_from={ref}: {e}") from None
    card, have, want = loaded.card, loaded.card.encoder.weights.sha256, info.encoder_record.weights.sha256
    pairs = {"preset": (card.preset, cfg.model.name), "image size": (card.image_size, info.image_size),
             "encoder": (card.encoder.name, cfg.encoder.name), "level": (card.encoder.level, cfg.level.name),
             "encoder weights": (have, want) if have and want else (None, None),  # compared where both are known
             "diffusion": (card.process, cfg.process())}  # what its output means: schedule, prediction
    pairs.update({f"UNet {k}": (v, getattr(unet_cfg, k)) for k, v in asdict(loaded.model.cfg).items()})
    differ = [f"{k} {a} (this job: {b})" for k, (a, b) in pairs.items() if a != b]
    if differ:
        raise UserError(f"train.init_from={ref} is another kind of model than this job trains: its " +
                        "; ".join(differ)[:600] + ". Start from a model of the same UNet, recipe options, encoder "
                        "and level, or drop train.init_from")
    weights = loaded.model.state_dict()
    model.load_state_dict(weights)
    ema.load_state_dict(weights)
    source = {"source": ref, "loaded": loaded.source, "steps": None, "train_seconds": None, "device": card.device,
              **(loaded.training or {})}
    log.info("starting from the weights of %s (%s steps)", loaded.source, source["steps"])
    return source
