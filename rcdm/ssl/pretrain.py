"""Train a ``tiny`` encoder with its own method's objective on the synthetic data, and save it in that
method's released on-disk layout, so the zoo's loaders read it like any published checkpoint."""
from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from rcdm import safe_load, synthetic
from rcdm.config import TrackingConfig
from rcdm.device import autocast, pick_device
from rcdm.encoders import build_encoder
from rcdm.encoders.layouts import to_release_layout
from rcdm.encoders.weights import sha256sum
from rcdm.errors import UserError
from rcdm.preprocess import to_uint8_tensor
from rcdm.provenance import Spent, cpu_model
from rcdm.ssl.augment import AugmentConfig, views
from rcdm.storage import write_local
from rcdm.ssl.objectives import DINOHead, DINOLoss, barlow_loss, nt_xent, vicreg_loss
from rcdm.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class MethodConfig:
    """One SSL method (``configs/method/``): its objective's hyper-parameters and its augmentations."""

    name: str = "vicreg"  # vicreg | dino | barlow | simclr
    steps: int = 1500
    lr: float = 2e-3
    params: dict[str, float] = field(default_factory=dict)  # the objective's (published values, scaled down)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class PretrainConfig:
    """``configs/pretrain_encoder.yaml``."""

    method: MethodConfig = field(default_factory=MethodConfig)
    output: str = "tiny_encoders/vicreg.pt"  # the checkpoint file; a .json with config and checksum beside it
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    images: int = 4096
    image_size: int = 32
    data_seed: int = 1  # the synthetic "pretrain" split: not the images the RCDMs train or probe on
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100  # steps between resume points (<output>.resume.pt, deleted once the file is written)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(uri=None, experiment="rcdm-encoders"))  # uri None: no MLflow run


METHODS = ("vicreg", "dino", "barlow", "simclr")


def check_pretrain(cfg: PretrainConfig) -> None:
    """A config that cannot train is one error naming the fix, before anything is built or written."""
    def bad(msg: str) -> None:
        raise UserError(f"pretraining config: {msg}")

    if cfg.method.name not in METHODS:
        bad(f"unknown method {cfg.method.name!r}; choose method=<{'|'.join(METHODS)}>")
    if not isinstance(cfg.steps, int) or cfg.steps <= 0:
        bad(f"steps={cfg.steps}: give a positive number of steps")
    if cfg.images < 2:
        bad(f"images={cfg.images}: give at least 2 images")
    if not 2 <= cfg.batch_size <= cfg.images:
        bad(f"batch_size={cfg.batch_size} with images={cfg.images}: the batch must hold 2 to {cfg.images} images "
            f"(lower batch_size or raise images)")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0) or not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        bad(f"lr={cfg.lr}, weight_decay={cfg.weight_decay}: the lr must be a positive number, the decay >= 0")
    if cfg.warmup_steps < 0 or cfg.checkpoint_every <= 0:
        bad(f"warmup_steps={cfg.warmup_steps}, checkpoint_every={cfg.checkpoint_every}: warmup_steps >= 0 and "
            f"checkpoint_every > 0")
    if not 8 <= cfg.image_size <= 512:
        bad(f"image_size={cfg.image_size}: give 8 to 512 pixels")
    j = cfg.method.augment.jitter
    if len(j) != 4 or not all(math.isfinite(v) and v >= 0 for v in j) or j[3] > 0.5:
        bad(f"method.augment.jitter={list(j)}: four amounts >= 0 (brightness, contrast, saturation, hue <= 0.5)")
    if not str(cfg.output).endswith(".pt"):
        bad(f"output={cfg.output}: the encoder file's name must end in .pt (its record is written beside it as .json)")


def synthetic_images(count: int, size: int, seed: int) -> torch.Tensor:
    """[count, 3, size, size] uint8 from the synthetic generator's "pretrain" split."""
    return torch.stack([to_uint8_tensor(synthetic.sample(seed, "pretrain", i, size)[0]) for i in range(count)])


def _lr_at(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _fingerprint(cfg: PretrainConfig) -> str:
    """What must be equal for a resume point to continue this run (where it is written and logged may differ)."""
    return json.dumps(asdict(cfg) | {"output": None, "tracking": None, "device": None}, sort_keys=True)


def _resume_path(cfg: PretrainConfig) -> str:
    return cfg.output.rsplit(".", 1)[0] + ".resume.pt"


def _save_resume(cfg: PretrainConfig, step: int, spent: Spent, last: dict, modules: dict, opt, gen) -> None:
    state = {"format": 1, "config": _fingerprint(cfg), "step": step, "seconds": spent.wall_s,
             "cpu_seconds": spent.cpu_s, "last": {k: float(v) for k, v in last.items()}, "optimizer": opt.state_dict(),
             "generator": gen.get_state(), "rng": torch.get_rng_state(),
             "modules": {k: {n: t.detach().cpu() for n, t in m.state_dict().items()} for k, m in modules.items()}}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_local(_resume_path(cfg), buf.getvalue())


def _load_resume(cfg: PretrainConfig, modules: dict, opt, gen) -> tuple[int, Spent, dict]:
    """(step, what it had spent, last) from ``<output>.resume.pt`` when an interrupted run of this config left one,
    loaded into ``modules``, the optimizer and the generator; (0, nothing, {}) otherwise. A resume point of another
    config is refused: it would mix two runs."""
    path = _resume_path(cfg)
    if not os.path.exists(path):
        return 0, Spent(), {}
    state = safe_load.load(path)
    if not isinstance(state, dict) or state.get("format") != 1 or not isinstance(state.get("modules"), dict):
        raise UserError(f"{path} is not a pretraining resume point; delete it to start afresh")
    if state.get("config") != _fingerprint(cfg):
        raise UserError(f"{path} was left by a pretraining run of another config; rerun with that config to finish "
                        f"it, or delete the file to start afresh")
    step = state.get("step")
    if not isinstance(step, int) or not 0 < step < cfg.steps or set(state["modules"]) != set(modules):
        raise UserError(f"{path} holds step {step!r} of {cfg.steps}; delete it to start afresh")
    try:
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path} does not fit this run ({e.__class__.__name__}: {str(e)[:200]}); delete it to start "
                        f"afresh") from None
    log.info("resuming %s pretraining at step %d from %s", cfg.method.name, step, path)
    return (step, Spent(float(state.get("seconds", 0.0)), float(state.get("cpu_seconds", 0.0))),
            dict(state.get("last") or {}))


def pretrain(cfg: PretrainConfig, every: int = 0, on_step=None) -> dict:
    """Train, save the release-layout file and its record; -> the record. ``on_step(step, encoder)``, when given, is
    called every ``every`` steps and at the last with the encoder as it would be saved (DINO's teacher), in eval
    mode (a curve of what it keeps against steps); it goes back to its mode afterwards."""
    check_pretrain(cfg)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    name, p = cfg.method.name, cfg.method.params
    encoder = build_encoder(name, "tiny", "random", seed=cfg.seed).train().requires_grad_(True).to(device)
    # the views at the training size; multi-crop is DINO's alone
    aug = replace(cfg.method.augment, size=cfg.image_size,
                  local_crops=cfg.method.augment.local_crops if name == "dino" else 0)
    # [N, 3, S, S] uint8, kept on the training device: the views are made there (a GPU is not left waiting
    # on CPU augmentation)
    images = synthetic_images(cfg.images, cfg.image_size, cfg.data_seed).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = list(encoder.parameters())
    student_head = teacher = teacher_head = dino_loss = None
    if name == "dino":
        student_head = DINOHead(encoder.dims["projector"], int(p["prototypes"])).to(device)
        params += [p for p in student_head.parameters() if p.requires_grad]
        teacher, teacher_head = copy.deepcopy(encoder).requires_grad_(False), copy.deepcopy(student_head).requires_grad_(False)
        dino_loss = DINOLoss(int(p["prototypes"]), p["student_temp"], p["center_momentum"]).to(device)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    modules = {"encoder": encoder, **({"student_head": student_head, "teacher": teacher, "teacher_head": teacher_head,
                                       "dino_loss": dino_loss} if name == "dino" else {})}
    step, earlier, last = _load_resume(cfg, modules, opt, gen)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment) if cfg.tracking.uri else None
    if tracker:
        tracker.start(None, f"pretrain-{name}-tiny", {"method": name, "arch": "tiny"}, asdict(cfg))
    clock = Spent.clock()
    try:
        while step < cfg.steps:
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step)
            batch = images[torch.randint(0, len(images), (cfg.batch_size,), generator=gen).to(device)]
            # [0, 1] -> [-1, 1]: the input range the sharding stage gives this encoder (x / 127.5 - 1)
            vs = [v * 2 - 1 for v in views(batch, aug, gen)]
            with autocast(device):
                loss, terms = _loss(cfg, encoder, vs, student_head, teacher, teacher_head, dino_loss, step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name} loss is {loss.item()} at step {step}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if teacher is not None:  # EMA teacher, momentum annealed to 1 (cosine)
                m = 1 - (1 - p["teacher_momentum"]) * (math.cos(math.pi * step / cfg.steps) + 1) / 2
                with torch.no_grad():
                    for src, dst in ((encoder, teacher), (student_head, teacher_head)):
                        for ps, pt in zip(src.state_dict().values(), dst.state_dict().values()):
                            if pt.dtype.is_floating_point:
                                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            step += 1
            last = {"loss": loss.item(), **terms, "lr": opt.param_groups[0]["lr"]}
            if on_step is not None and every and (step % every == 0 or step == cfg.steps):
                current = teacher if teacher is not None else encoder
                was = current.training
                with torch.no_grad():
                    on_step(step, current.eval())
                current.train(was)
            if step % 10 == 0 or step == cfg.steps:
                log.info("%s step %d: %s", name, step, {k: round(v, 4) for k, v in last.items()})
                if tracker:
                    tracker.log_metrics(last, step, int(time.time() * 1000))
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _save_resume(cfg, step, earlier.since(clock), last, modules, opt, gen)
    except BaseException:
        if tracker:
            tracker.end("FAILED")
        raise
    spent = earlier.since(clock)
    final = (teacher if teacher is not None else encoder).eval()
    extra = {"head.last_layer": teacher_head.last_layer} if teacher_head is not None else {}
    buf = io.BytesIO()
    torch.save(to_release_layout(final, extra), buf)
    write_local(cfg.output, buf.getvalue())
    record = {"method": name, "arch": "tiny", "file": cfg.output.rsplit("/", 1)[-1],
              "sha256": sha256sum(cfg.output), "steps": step, "seconds": round(spent.wall_s, 1),
              "cpu_seconds": round(spent.cpu_s, 1),  # this process's, all its threads
              "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                         else f"CPU {cpu_model()}, {torch.get_num_threads()} threads"),
              "final": last, "config": asdict(cfg) | {"output": None, "tracking": None}}
    write_local(cfg.output.rsplit(".", 1)[0] + ".json", json.dumps(record, indent=2, sort_keys=True))
    if os.path.exists(_resume_path(cfg)):
        os.unlink(_resume_path(cfg))  # the file and its record are whole: nothing left to resume
    if tracker:
        tracker.end("FINISHED")
    return record


def _loss(cfg, encoder, views, student_head, teacher, teacher_head, dino_loss, step):
    name, p = cfg.method.name, cfg.method.params
    if name == "dino":
        warm = min(1, step / max(1, p["warmup_teacher_steps"]))
        tt = p["warmup_teacher_temp"] + (p["teacher_temp"] - p["warmup_teacher_temp"]) * warm
        student = [student_head(encoder(v)["projector"]) for v in views]
        with torch.no_grad():
            teach = [teacher_head(teacher(v)["projector"]) for v in views[:2]]  # the teacher sees global views
        return dino_loss(student, teach, tt)
    z1, z2 = (encoder(v)["projector"].float() for v in views[:2])
    if name == "vicreg":
        return vicreg_loss(z1, z2, p["sim"], p["var"], p["cov"])
    if name == "barlow":
        return barlow_loss(z1, z2, p["lambd"])
    if name == "simclr":
        return nt_xent(z1, z2, p["temperature"])
    raise ValueError(f"unknown method {name!r}; choose vicreg, dino, barlow or simclr")
