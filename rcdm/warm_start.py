"""``train.init_from``: a run that starts from another trained RCDM's weights (a shipped demo model, a run, a file),
refused unless that model is the same kind as the one the job trains.

``train.init_parts=decoder`` starts from another RCDM's decoder instead: every weight but the conditioning input
(``ssl_emb``, the null embedding and the embedding statistics, which belong to the source's encoder), so a model
trained once on the demo images can start jobs of any encoder and level. The job's ``ssl_emb`` starts at zero
weight and the source's bias: at step 0 every embedding conditions the decoder as the source's mean embedding did
(whitened or normalised embeddings have mean 0), and what the job's own embedding says is learned from there, the
zero-initialised input of adaLN-Zero (Peebles & Xie 2023)."""
from __future__ import annotations

import logging
from dataclasses import asdict

from rcdm.config import TrainConfig
from rcdm.data import DatasetInfo
from rcdm.errors import UserError
from rcdm.train_checkpoints import StartRecord

log = logging.getLogger("rcdm.train")


# the conditioning input: the source's encoder's, never copied by a decoder warm start
CONDITIONING = ("ssl_emb.", "null_emb", "emb_mean", "emb_std", "emb_white")
# what may differ between a decoder's source and the job: the conditioning input's width and normalisation
CONDITIONING_OPTIONS = {"embed_dim", "normalize_embeddings", "whiten_embeddings", "null_embedding"}


def warm_start(ref: str, cfg: TrainConfig, info: DatasetInfo, unet_cfg, model, ema) -> StartRecord:
    """Copy a trained RCDM's EMA weights (its embedding statistics included: its weights were trained on them)
    into ``model`` and ``ema``; refused unless it is the same UNet, for the same encoder weights and level.
    Returns what the run records about its start (``init_from.json``): the source, its digest, its training."""
    from rcdm.model_files import load_checkpoint

    try:
        loaded = load_checkpoint(ref, download=False, storage=cfg.storage)
    except UserError as e:
        raise UserError(f"train.init_from={ref}: {e}") from None
    card, have, want = loaded.card, loaded.card.encoder.weights.sha256, info.encoder_record.weights.sha256
    if cfg.train.init_parts == "decoder":
        return _decoder_start(ref, loaded, cfg, unet_cfg, model, ema)
    pairs = {"preset": (card.preset, cfg.model.name), "image size": (card.image_size, info.image_size),
             "encoder": (card.encoder.name, cfg.encoder.name), "level": (card.encoder.level, cfg.level.name),
             "encoder weights": (have, want) if have and want else (None, None),  # compared where both are known
             "diffusion": (card.process, cfg.process())}  # what its output means: schedule, prediction
    differ = [f"{k} {a} (this job: {b})" for k, (a, b) in pairs.items() if a != b] + unet_differences(loaded, unet_cfg)
    if differ:
        raise UserError(f"train.init_from={ref} is another kind of model than this job trains: its " +
                        "; ".join(differ)[:600] + ". Start from a model of the same UNet, recipe options, encoder "
                        "and level, or drop train.init_from")
    weights = loaded.model.state_dict()
    model.load_state_dict(weights)
    ema.load_state_dict(weights)
    source = _record(ref, loaded, "all")
    log.info("starting from the weights of %s (%s steps)", loaded.source, source.steps)
    return source


def _record(ref: str, loaded, parts: str) -> StartRecord:
    card = loaded.card
    d = {"source": ref, "loaded": loaded.source, "device": card.device, **(loaded.training or {}), "parts": parts,
         "source_encoder": f"{card.encoder.name} {card.encoder.level}"}
    return StartRecord.from_dict(d, f"the training record of {loaded.source}")


def unet_differences(loaded, unet_cfg, free: frozenset | set = frozenset()) -> list[str]:
    """The UNet options in which ``loaded``'s model differs from the job's, but those in ``free``."""
    mine = asdict(unet_cfg)
    return [f"UNet {k} {v} (this job: {mine[k]})" for k, v in asdict(loaded.model.cfg).items()
            if k not in free and v != mine[k]]


def _decoder_start(ref: str, loaded, cfg: TrainConfig, unet_cfg, model, ema) -> StartRecord:
    """Every weight of the source but its conditioning input; refused unless the rest is the same UNet trained for
    the same diffusion (what its output means)."""
    import torch

    card = loaded.card
    differ = unet_differences(loaded, unet_cfg, CONDITIONING_OPTIONS)
    if card.process != cfg.process():
        differ.append(f"diffusion {card.process} (this job: {cfg.process()})")
    if differ:
        raise UserError(f"train.init_from={ref} (train.init_parts=decoder) is another decoder than this job trains: "
                        + "; ".join(differ)[:600] + ". Start from a model of the same UNet preset and recipe, or train from "
                        "scratch with train.init_from=null")
    source_sd, target = loaded.model.state_dict(), model.state_dict()
    with torch.no_grad():
        target.update({k: v for k, v in source_sd.items() if not k.startswith(CONDITIONING)})
        target["ssl_emb.weight"] = torch.zeros_like(target["ssl_emb.weight"])
        target["ssl_emb.bias"] = source_sd["ssl_emb.bias"].clone()
    model.load_state_dict(target)
    ema.load_state_dict(target)
    source = _record(ref, loaded, "decoder")
    log.info("starting from the decoder of %s (%s steps; its %s conditioning input left behind)", loaded.source,
             source.steps, source.source_encoder)
    return source
