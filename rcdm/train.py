"""``train(cfg)``: one RCDM on one (encoder, level) of a sharded dataset; returns its final metrics.

Runs the same on a laptop CPU (one process) and on SLURM (DDP over every task of the job). Rank 0
alone writes checkpoints and talks to MLflow; every rank resumes from the newest checkpoint.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from rcdm import checkpointing, distributed
from rcdm.analysis.faithfulness import faithfulness, flat_metrics
from rcdm.checkpoints import encoder_weights_arg
from rcdm.data import heldout, open_dataset, train_loader
from rcdm.device import autocast
from rcdm.diffusion.gaussian import create_diffusion
from rcdm.diffusion.likelihood import quartile_means
from rcdm.encoders import build_encoder
from rcdm.errors import UserError
from rcdm.preprocess import Preprocess
from rcdm.presets import build_unet
from rcdm.sampling import draw, grid_png
from rcdm.storage import StorageOptions, atomic_open, join, open_fs, recorded_run_id, write_json
from rcdm.tracking import PARENT_TAG, Tracker

log = logging.getLogger(__name__)
PREEMPT_SIGNAL = signal.SIGUSR2  # what submitit (and SLURM's --signal) sends before a time limit or preemption


class Preempted(Exception):
    """The job checkpointed on the preemption signal and stopped; start it again to continue."""

    def __init__(self, message: str, previous_handler=None):
        super().__init__(message)
        self.previous_handler = previous_handler


@dataclass
class TrainConfig:
    data_url: str
    encoder: str
    level: str
    run_root: str  # this job's folder: R/<experiment>/<sweep id>/<job name>
    preset: str = "tiny"
    split: str = "train"
    heldout_split: str = "val"  # falls back to the training split when the dataset has none
    steps: int = 100
    batch_size: int = 16  # global, split over ranks
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    schedule: str = "linear"
    diffusion_steps: int = 1000
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    sample_every: int = 50
    grid_images: int = 8
    grid_samples: int = 3
    grid_steps: str = "ddim25"
    faithfulness_images: int = 64  # held-out embeddings scored at the end of the run (0: off)
    faithfulness_steps: str = "ddim25"
    loader_workers: int = 1
    seed: int = 0
    device: str = "auto"
    compile: bool = False  # torch.compile the UNet (GPU)
    storage: StorageOptions = field(default_factory=StorageOptions)
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "rcdm"
    run_name: str = "job"
    parent_run_file: str | None = None  # JSON holding the sweep's parent run id
    config: dict = field(default_factory=dict)  # the resolved config, for params and checkpoints


class _Flag:
    """Set by the preemption signal; read at step boundaries, never acted on inside the handler."""

    def __init__(self):
        self.raised = False
        self.previous = None

    def __call__(self, signum, frame):
        log.warning("received signal %d: checkpointing at the end of this step", signum)
        self.raised = True


def forward_losses(net, diffusion, x: torch.Tensor, h: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample hybrid-loss terms of a batch (images [B, 3, S, S], embeddings [B, D], timesteps [B])."""
    with autocast(x.device):
        return diffusion.training_losses(net, x, t, h, noise=noise)


def apply_update(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> float:
    """Backward (DDP averages gradients across ranks here), clip, step; returns the pre-clip grad norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(grad_norm)


def restore(run_root: str, storage: StorageOptions, model, ema, opt) -> tuple[int, dict | None, str | None]:
    """Load the newest checkpoint under ``run_root`` into model, EMA and optimizer; (step, state, url)."""
    url = checkpointing.latest_path(run_root, storage)
    if url is None:
        return 0, None, None
    state = checkpointing.load(url, storage)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    checkpointing.set_rng_state(state["rng"])
    return state["step"], state, url


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def _slurm_job_id() -> str:
    """The id sacct knows this job by: ``<array>_<task>`` for an array task, else the job id."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def _resolve_run_id(cfg: TrainConfig, state: dict | None) -> str | None:
    """The MLflow run this job continues: from its checkpoint, else from its run file."""
    if state and state.get("mlflow_run_id"):
        return state["mlflow_run_id"]
    return recorded_run_id(join(cfg.run_root, "mlflow_run.json"), cfg.storage)


def model_meta(cfg: TrainConfig, info) -> dict:
    """What a checkpoint says about itself, so sampling needs nothing else."""
    enc = info.encoder_record
    return {"preset": cfg.preset, "embed_dim": info.embed_dim, "image_size": info.image_size,
            "encoder": cfg.encoder, "level": cfg.level, "encoder_arch": enc["arch"], "encoder_weights": enc["weights"],
            "encoder_sha256": enc["sha256"], "preprocess": enc["preprocess"], "schedule": cfg.schedule,
            "num_steps": cfg.diffusion_steps, "dataset": cfg.data_url}


def train(cfg: TrainConfig) -> dict:
    dist = distributed.init(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        distributed.shutdown()


def _train(cfg: TrainConfig, dist: distributed.DistInfo) -> dict:
    device = dist.device
    if cfg.batch_size % dist.world:
        raise UserError(f"batch_size={cfg.batch_size} does not split over {dist.world} ranks")
    info = open_dataset(cfg.data_url, cfg.encoder, cfg.level, cfg.split, cfg.storage)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_unet(cfg.preset, info.embed_dim).to(device)
    if model.cfg.image_size != info.image_size:
        raise UserError(f"model={cfg.preset} is for {model.cfg.image_size} px images but the dataset holds "
                        f"{info.image_size} px; pick a matching model or dataset")
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")

    step, state, ckpt_url = restore(cfg.run_root, cfg.storage, model, ema, opt)
    for group in opt.param_groups:  # the config's hyper-parameters win over the checkpoint's
        group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state:
        log.info("resuming from %s at step %d", ckpt_url, step)
    else:
        torch.manual_seed(cfg.seed + 1000 * dist.rank)  # different noise per rank from here on

    tracker = None
    if dist.is_main:
        tracker = Tracker(cfg.tracking_uri, cfg.experiment)
        tags = {"encoder": cfg.encoder, "level": cfg.level, "slurm_job_id": _slurm_job_id(), "run_root": cfg.run_root,
                "dataset": cfg.data_url, "preset": cfg.preset, "world_size": str(dist.world),
                # how often SLURM requeued this job, and where this start picked up: set again at every start
                "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"), "started_at_step": str(step)}
        parent = recorded_run_id(cfg.parent_run_file, cfg.storage) if cfg.parent_run_file else None
        if parent:
            tags[PARENT_TAG] = parent
        run_id = tracker.start(_resolve_run_id(cfg, state), cfg.run_name, tags, cfg.config)
        fs, root = open_fs(cfg.run_root, cfg.storage)
        write_json(fs, join(root, "mlflow_run.json"), {"run_id": run_id, "tracking_uri": cfg.tracking_uri})
        log.info("MLflow run %s (%s): %s", run_id, "resumed" if tracker.resumed else "new", tracker.link())
    try:
        start_step = step
        metrics = _loop(cfg, dist, info, model, ema, opt, step, tracker)
        if tracker and cfg.faithfulness_images and start_step < cfg.steps:
            metrics.update(_log_faithfulness(cfg, ema, info, metrics["step"], tracker, device))
    except Preempted as e:
        if tracker:
            tracker.end("KILLED")
        if callable(e.previous_handler):  # submitit's: requeues the job (rank 0) and exits
            e.previous_handler(PREEMPT_SIGNAL, None)
        raise
    except BaseException:
        if tracker:
            tracker.end("FAILED")
        raise
    if tracker:
        tracker.end("FINISHED")
    return metrics


def _loop(cfg, dist, info, model, ema, opt, step, tracker) -> dict:
    device = dist.device
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.world > 1 else model
    net = torch.compile(ddp) if cfg.compile else ddp
    diffusion = create_diffusion(cfg.schedule, cfg.diffusion_steps)
    per_rank = cfg.batch_size // dist.world
    batches = iter(train_loader(info, per_rank, dist.rank, dist.world, cfg.seed + step, cfg.loader_workers, cfg.storage))
    grid = _heldout(cfg, info) if dist.is_main else None
    flag = _Flag()
    flag.previous = signal.signal(PREEMPT_SIGNAL, flag)
    window: dict[str, list] = {"loss": [], "mse": [], "vb": [], "t": [], "grad_norm": []}
    wait_s, busy_t0 = 0.0, time.perf_counter()
    last = {}
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            x, h = next(batches)
            wait_s += time.perf_counter() - t0
            x, h = x.to(device, non_blocking=True), h.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            t = torch.randint(0, diffusion.num_timesteps, (len(x),), device=device)
            losses = forward_losses(net, diffusion, x, h, t)
            stop = distributed.any_flag(flag.raised, dist)
            if distributed.any_flag(not torch.isfinite(losses["loss"].mean()).item(), dist):
                raise FloatingPointError(f"loss is {losses['loss'].mean().item()} at step {step + 1}; stopping "
                                         f"without saving (the last good checkpoint stays the newest); lower lr or "
                                         f"check the data")
            grad_norm = apply_update(model, opt, losses["loss"].mean(), cfg.grad_clip)
            step += 1
            _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))  # warm-up for short runs
            for k in ("loss", "mse", "vb"):
                window[k].append(losses[k].detach().float().cpu())
            window["t"].append(t.cpu())
            window["grad_norm"].append(grad_norm)
            if tracker and (step % cfg.log_every == 0 or step == cfg.steps):
                elapsed = time.perf_counter() - busy_t0
                last = _summarise(window, diffusion.num_timesteps, opt, elapsed, wait_s, per_rank * dist.world)
                tracker.log_metrics(last, step, int(time.time() * 1000))
                window = {k: [] for k in window}
                wait_s, busy_t0 = 0.0, time.perf_counter()
            if stop or step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save(cfg, dist, model, ema, opt, step, tracker, info)
            if tracker and (step % cfg.sample_every == 0 or step == cfg.steps):
                _log_grid(cfg, ema, grid, step, tracker, device)
            if stop:
                raise Preempted(f"checkpointed at step {step} on signal {int(PREEMPT_SIGNAL)}", flag.previous)
    finally:
        signal.signal(PREEMPT_SIGNAL, flag.previous if flag.previous is not None else signal.SIG_DFL)
    return {**last, "step": step}


def _summarise(window: dict, num_timesteps: int, opt, elapsed: float, wait_s: float, global_batch: int) -> dict:
    loss, mse, vb, t = (torch.cat(window[k]) for k in ("loss", "mse", "vb", "t"))
    steps = len(window["grad_norm"])
    out = {"loss": loss.mean().item(), "mse": mse.mean().item(), "vb": vb.mean().item(),
           "grad_norm": sum(window["grad_norm"]) / steps, "lr": opt.param_groups[0]["lr"],
           "images_per_s": steps * global_batch / max(elapsed, 1e-9),
           "data_wait_fraction": wait_s / max(elapsed, 1e-9)}
    out.update(quartile_means(loss, t, num_timesteps, "loss"))
    out.update(quartile_means(mse, t, num_timesteps, "mse"))
    return out


def _save(cfg, dist, model, ema, opt, step, tracker, info) -> None:
    if dist.is_main:
        checkpointing.save(cfg.run_root, {
            "step": step, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scaler": None, "rng": checkpointing.rng_state(), "config": cfg.config,
            "mlflow_run_id": tracker.run_id if tracker else None, "meta": model_meta(cfg, info),
        }, cfg.storage, keep=cfg.keep_checkpoints)
        tracker.set_tag("checkpoint", join(cfg.run_root, "checkpoints"))
    distributed.barrier(dist)


def _heldout(cfg: TrainConfig, info):
    split = cfg.heldout_split if cfg.heldout_split in info.manifest["splits"] else info.split
    if split != cfg.heldout_split:
        log.warning("dataset has no %s split: sample grids condition on the first training images", cfg.heldout_split)
    held = open_dataset(info.url, info.encoder, info.level, split, cfg.storage)
    return heldout(held, cfg.grid_images, cfg.storage)


def _log_faithfulness(cfg: TrainConfig, ema, info, step: int, tracker, device) -> dict:
    """The RCDM faithfulness protocol on the first held-out embeddings, from the EMA model; logged to the run
    (scalars as metrics at the final step, the full result with per-image ranks as faithfulness.json)."""
    rec = info.encoder_record
    try:
        weights, seed = encoder_weights_arg(rec["weights"], cfg.encoder)
        encoder = build_encoder(cfg.encoder, rec["arch"], weights, seed=seed)
        if encoder.weights_sha256 != rec["sha256"]:
            raise UserError(f"encoder weights {encoder.weights_source} are not those the dataset was embedded with")
    except UserError as e:  # the model is trained; a missing encoder file must not fail the job
        log.warning("faithfulness skipped: %s", e)
        tracker.set_tag("faithfulness", f"skipped: {e}")
        return {}
    encoder.preprocess = Preprocess.from_dict(rec["preprocess"])
    encoder.to(device)
    split = cfg.heldout_split if cfg.heldout_split in info.manifest["splits"] else info.split
    held = open_dataset(info.url, info.encoder, info.level, split, cfg.storage)
    _, h, keys = heldout(held, cfg.faithfulness_images, cfg.storage)
    if len(keys) < 2:
        tracker.set_tag("faithfulness", f"skipped: split {split} has fewer than 2 images")
        return {}
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    t0 = time.perf_counter()
    samples = draw(ema, cfg.schedule, cfg.diffusion_steps, h.to(device), cfg.faithfulness_steps,
                   "ddim" if cfg.faithfulness_steps.startswith("ddim") else "ddpm", 64, gen)
    result = faithfulness(h, samples, encoder, cfg.level)
    result.update(split=split, keys=keys, steps=cfg.faithfulness_steps, seconds=time.perf_counter() - t0,
                  model_step=step)
    flat = flat_metrics(result)
    tracker.log_metrics(flat, step, int(time.time() * 1000), once=True)  # the loss already logged this step
    fs, root = open_fs(cfg.run_root, cfg.storage)
    write_json(fs, join(root, "faithfulness.json"), result)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "faithfulness.json")
        with open(local, "w") as f:
            json.dump(result, f, indent=2)
        tracker.log_artifact(local)
    log.info("faithfulness on %d held-out images (%s): MRR %.3f [%.3f, %.3f], top-1 %.3f, mean rank %.2f "
             "(chance MRR %.3f)", result["n"], cfg.faithfulness_steps, result["mrr"], *result["mrr_ci95"],
             result["top1"], result["mean_rank"], result["chance"]["mrr"])
    return flat


def _log_grid(cfg, ema, grid, step: int, tracker, device) -> None:
    x, h, _ = grid
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the same noise at every step: comparable grids
    samples = draw(ema, cfg.schedule, cfg.diffusion_steps, h.to(device).repeat_interleave(cfg.grid_samples, 0),
                   cfg.grid_steps, "ddim" if cfg.grid_steps.startswith("ddim") else "ddpm", 64, gen)
    png = grid_png(x, samples)
    fs, root = open_fs(cfg.run_root, cfg.storage)
    name = f"step-{step:09d}.png"
    with atomic_open(fs, join(root, "samples", name)) as f:
        f.write(png)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        with open(local, "wb") as f:
            f.write(png)
        tracker.log_artifact(local, "samples")

