"""``train(cfg)``: one RCDM on one (encoder, level) of a sharded dataset; returns its final metrics.

Runs the same on a laptop CPU (one process) and on SLURM (DDP over every task of the job). Rank 0
alone writes checkpoints and talks to MLflow; every rank resumes from the newest checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from rcdm import distributed, train_checkpoints
from rcdm.config import LoopConfig, RecipeConfig, TrainConfig
from rcdm.data import DatasetInfo, embedding_stats, open_dataset, train_loader
from rcdm.device import autocast, describe, training_precision
from rcdm.diffusion.likelihood import quartile_means
from rcdm.diffusion.schedules import training_timesteps
from rcdm.errors import UserError
from rcdm.evaluation import Evaluator
from rcdm.encoders import EncoderCard
from rcdm.lease import Lease, slurm_job_id
from rcdm.model_card import ModelCard
from rcdm.preprocess import Preprocess
from rcdm.presets import preset_config
from rcdm.provenance import Spent, code_version
from rcdm.redaction import guard_logging, scrub
from rcdm.storage import join, open_fs, recorded_run_id, refuse_linked_entries, write_json
from rcdm.tracking import PARENT_TAG, Tracker, check_reachable
from rcdm.unet import RCDMUNet
from rcdm.train_state import TrainState, restore
from rcdm.warm_start import warm_start

log = logging.getLogger(__name__)
PREEMPT_SIGNAL = signal.SIGUSR2  # what submitit (and SLURM's --signal) sends before a time limit or preemption


class Preempted(Exception):
    """The job checkpointed on the preemption signal and stopped; start it again to continue."""

    def __init__(self, message: str, previous_handler=None):
        super().__init__(message)
        self.previous_handler = previous_handler


class _Flag:
    """Set by the preemption signal; read at step boundaries, never acted on inside the handler."""

    def __init__(self):
        self.raised = False
        self.previous = None

    def __call__(self, signum, frame):
        log.warning("received signal %d: checkpointing at the end of this step", signum)
        self.raised = True


def forward_losses(net, diffusion, x: torch.Tensor, h: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor | None = None, drop: torch.Tensor | None = None,
                   recipe: RecipeConfig | None = None, precision: str | None = None) -> dict[str, torch.Tensor]:
    """Per-sample loss terms of a batch (images [B, 3, S, S], embeddings [B, D], timesteps [B], ``drop`` [B]
    rows on the null embedding) under ``recipe`` (default: the ADM recipe's hybrid loss), in ``precision``
    (rcdm.device.training_precision; None: bf16 on CUDA, fp32 on CPU)."""
    recipe = recipe or RecipeConfig()
    with autocast(x.device, precision):
        return diffusion.training_losses(net, x, t, h, noise=noise, drop=drop, weighting=recipe.weighting,
                                         min_snr_gamma=recipe.min_snr_gamma)


def apply_update(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> float:
    """Backward (DDP averages gradients across ranks here), clip, step; returns the pre-clip grad norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(grad_norm)


def representation_dropout(n: int, p: float, device: torch.device) -> torch.Tensor | None:
    """[n] bool: the rows of a batch trained on the null embedding, each with probability ``p`` (None if 0)."""
    return torch.rand(n, device=device) < p if p > 0 else None


def learning_rate(t: LoopConfig, warmup_steps: int, step: int) -> float:
    """The lr of update ``step`` (0-based): linear warm-up over ``warmup_steps``, then ``t.lr_schedule``."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if t.lr_schedule == "constant":
        return t.lr * warm
    if t.lr_schedule == "cosine":
        return t.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step, t.steps) / t.steps))
    raise UserError(f"unknown train.lr_schedule {t.lr_schedule!r}; choose constant or cosine")


@dataclass
class _Job:
    """What one start of a job works with besides its state: the config, the ranks, the dataset, the model card
    (built once per run), and on rank 0 the MLflow run, the evaluator and the run root's lease."""

    cfg: TrainConfig
    dist: distributed.DistInfo
    info: DatasetInfo
    card: ModelCard
    tracker: Tracker | None = None
    evaluator: Evaluator | None = None
    lease: Lease | None = None


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of all random draws of update ``step`` on ``rank``: a resumed job draws what an
    uninterrupted one drew, with no RNG state to carry over."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()[:8], "little") >> 1


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def _resolve_run_id(cfg: TrainConfig, state: dict | None) -> str | None:
    """The MLflow run this job continues: from its checkpoint, else from its run file."""
    if state and state.get("mlflow_run_id"):
        return state["mlflow_run_id"]
    return recorded_run_id(join(cfg.run_root, "mlflow_run.json"), cfg.storage)


def model_card(cfg: TrainConfig, info: DatasetInfo, dist: distributed.DistInfo | None = None) -> ModelCard:
    """What a checkpoint says about itself, so sampling needs nothing else (and the hardware that trained it)."""
    enc = info.encoder_record
    return ModelCard(cfg.model.name, info.embed_dim, info.image_size, cfg.process(),
                     EncoderCard(cfg.encoder.name, enc.arch, cfg.level.name, enc.weights,
                                 Preprocess.from_dict(enc.preprocess)),
                     cfg.recipe.unet_options(), asdict(cfg.recipe), cfg.data.url,
                     f"{describe(dist.device, dist.world)}, {training_precision(cfg.train.precision, dist.device)}"
                     if dist else None)


def train(cfg: TrainConfig) -> dict:
    guard_logging()  # no credential in a log line, on the console or in Hydra's job log
    started = time.perf_counter()
    dist = distributed.init(cfg.device)
    try:
        return _train(cfg, dist, started)
    finally:
        distributed.shutdown()


def _train(cfg: TrainConfig, dist: distributed.DistInfo, started: float) -> dict:
    t = cfg.train
    if t.batch_size % dist.world:
        raise UserError(f"train.batch_size={t.batch_size} does not split over {dist.world} ranks")
    info = open_dataset(cfg.data.url, cfg.encoder.name, cfg.level.name, cfg.data.split, cfg.storage)
    unet_cfg = preset_config(cfg.model.name, info.embed_dim, **cfg.recipe.unet_options())
    if unet_cfg.image_size != info.image_size:  # refused before a (possibly huge) model is built
        raise UserError(f"model={cfg.model.name} is for {unet_cfg.image_size} px images but the dataset holds "
                        f"{info.image_size} px; pick a matching model or dataset")
    lease = Lease(cfg.run_root, cfg.storage, t.lease_s)
    refused = None
    if dist.is_main:
        check_reachable(cfg.tracking.uri)
        try:
            refuse_linked_entries(*open_fs(cfg.run_root, cfg.storage), ("checkpoints", "samples"))
            lease.acquire()  # before anything is read or written under the run root
        except UserError as e:
            refused = e
    if distributed.any_flag(refused is not None, dist):
        raise refused or UserError(f"rank 0 could not take the lease on {cfg.run_root}")
    try:
        return _train_leased(cfg, dist, info, unet_cfg, lease, started)
    finally:
        lease.release()


def _train_leased(cfg: TrainConfig, dist: distributed.DistInfo, info: DatasetInfo, unet_cfg, lease: Lease,
                  started: float) -> dict:
    device, t = dist.device, cfg.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = RCDMUNet(unet_cfg).to(device)
    if cfg.recipe.normalize_embeddings:  # a resumed job gets them back from its checkpoint
        mean, std, white = embedding_stats(info, cfg.storage, whiten=cfg.recipe.whiten_embeddings)
        model.emb_mean.copy_(mean)
        model.emb_std.copy_(std)
        if white is not None:
            model.emb_white.copy_(white)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=device.type == "cuda")

    step, state, ckpt_url = restore(cfg.run_root, cfg.storage, model, ema, opt)
    run = TrainState(model, ema, opt, step, Spent.of(state))
    job = _Job(cfg, dist, info, model_card(cfg, info, dist), lease=lease)
    if state is None and t.init_from:  # a resumed run keeps its own weights
        source = warm_start(t.init_from, cfg, info, unet_cfg, model, ema)
        if dist.is_main:
            train_checkpoints.write_start(*open_fs(cfg.run_root, cfg.storage), source)
    for group in opt.param_groups:  # the config's hyper-parameters win over the checkpoint's
        group.update(lr=t.lr, weight_decay=t.weight_decay)
    if state:
        log.info("resuming from %s at step %d", ckpt_url, step)

    tracker = None
    try:
        if dist.is_main:
            job.tracker = tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
            tags = {"encoder": cfg.encoder.name, "level": cfg.level.name, "slurm_job_id": slurm_job_id(),
                    "run_root": cfg.run_root, "dataset": cfg.data.url, "preset": cfg.model.name,
                    "world_size": str(dist.world),
                    # how often SLURM requeued this job, and where this start picked up: set again at every start
                    "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"), "started_at_step": str(step),
                    "code_version": code_version(), "dataset_manifest_sha256": info.manifest.digest()}
            parent = recorded_run_id(cfg.parent_run_file, cfg.storage)
            if parent:
                tags[PARENT_TAG] = parent
            run_id = tracker.start(_resolve_run_id(cfg, state), cfg.job_name, tags, cfg.to_dict())
            fs, root = open_fs(cfg.run_root, cfg.storage)
            write_json(fs, join(root, "mlflow_run.json"), {"run_id": run_id, "tracking_uri": scrub(cfg.tracking.uri)})
            log.info("MLflow run %s (%s): %s", run_id, "resumed" if tracker.resumed else "new", tracker.link())
            job.evaluator = Evaluator(cfg, info, tracker, device, job.card)
            job.evaluator.seconds["setup"] = time.perf_counter() - started  # dataset, model, statistics, tracking
        metrics = _loop(job, run)
    except Preempted as e:
        if tracker and tracker.run_id:
            tracker.end("KILLED")
        if callable(e.previous_handler):  # submitit's: requeues the job (rank 0) and exits
            try:
                e.previous_handler(PREEMPT_SIGNAL, None)
            except subprocess.CalledProcessError as err:
                # `scontrol requeue` can be killed by the very SIGTERM the accepted requeue sends the job when the
                # node is slow: the job is requeued all the same, so this start ends as preempted
                if err.returncode != -signal.SIGTERM:
                    raise
                log.warning("scontrol requeue ended with the requeue's own SIGTERM: the job is requeued")
        raise
    except BaseException as e:
        if tracker and tracker.run_id:  # every run this start opened ends FAILED, whatever failed
            with contextlib.suppress(Exception):  # the sweep report shows why a run failed; never hide e
                tracker.set_tag("error", f"{type(e).__name__}: {e}"[:4000])
            with contextlib.suppress(Exception):
                tracker.end("FAILED")
        raise
    if tracker:
        tracker.end("FINISHED")
    return metrics


def _loop(job: _Job, run: TrainState) -> dict:
    """Train ``run`` from its step to ``train.steps`` (its step and what it has spent are updated)."""
    cfg, dist, info, tracker, evaluator, lease = job.cfg, job.dist, job.info, job.tracker, job.evaluator, job.lease
    model, ema, opt, step, spent = run.model, run.ema, run.opt, run.step, run.spent
    device, t = dist.device, cfg.train
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.world > 1 else model
    net = torch.compile(ddp) if t.compile else ddp
    diffusion = cfg.process().build()
    recipe = cfg.recipe
    per_rank = t.batch_size // dist.world
    precision = training_precision(t.precision, device)
    log.info("training in %s on %s", precision, describe(device, dist.world))
    if tracker:
        tracker.set_tag("precision", precision)
    batches = iter(train_loader(info, per_rank, dist.rank, dist.world, t.seed, t.loader_workers, cfg.storage, step))
    flag = _Flag()
    flag.previous = signal.signal(PREEMPT_SIGNAL, flag)
    window: dict[str, list] = {"loss": [], "mse": [], "t": [], "grad_norm": []}
    wait_s, busy_t0 = 0.0, time.perf_counter()
    last, final, start_train_s = {}, {}, spent.wall_s
    bar = tqdm(total=t.steps, initial=step, desc=cfg.job_name, unit="step", dynamic_ncols=True,
               disable=not (dist.is_main and t.progress and sys.stderr.isatty()))
    try:
        while step < t.steps:
            if lease:
                lease.check()  # another launch took this run root: stop before writing anything more
            clock = Spent.clock()
            x, h = next(batches)
            wait_s += time.perf_counter() - clock[0]
            x, h = x.to(device, non_blocking=True), h.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            torch.manual_seed(step_seed(t.seed, dist.rank, step))  # t, noise, dropout: a function of the step
            ts = training_timesteps(len(x), diffusion.num_timesteps, device, recipe.timesteps, recipe.timestep_mean,
                                    recipe.timestep_std)
            drop = representation_dropout(len(x), recipe.cond_drop, device)
            for group in opt.param_groups:
                group["lr"] = learning_rate(t, recipe.warmup_steps, step)
            losses = forward_losses(net, diffusion, x, h, ts, drop=drop, recipe=recipe, precision=precision)
            stop = distributed.any_flag(flag.raised, dist)
            if distributed.any_flag(not torch.isfinite(losses["loss"].mean()).item(), dist):
                raise FloatingPointError(f"loss is {losses['loss'].mean().item()} at step {step + 1}; stopping "
                                         f"without saving (the last good checkpoint stays the newest); lower lr or "
                                         f"check the data")
            grad_norm = apply_update(model, opt, losses["loss"].mean(), t.grad_clip)
            step = run.step = step + 1
            _ema_update(ema, model, min(t.ema_decay, (1 + step) / (10 + step)))  # warm-up for short runs
            spent.add_since(clock)  # data, update and EMA: what the run's length costs
            for k in losses:
                window.setdefault(k, []).append(losses[k].detach().float().cpu())
            window["t"].append(ts.cpu())
            window["grad_norm"].append(grad_norm)
            bar.update(1)
            if tracker and (step % t.log_every == 0 or step == t.steps):
                elapsed = time.perf_counter() - busy_t0
                last = _summarise(window, diffusion.num_timesteps, opt, elapsed, wait_s, per_rank * dist.world)
                last["train_seconds"] = spent.wall_s
                if spent.cpu_s is not None:
                    last["train_cpu_seconds"] = spent.cpu_s
                last.update(evaluator.diagnose(ema, step))
                tracker.log_metrics(last, step, int(time.time() * 1000))
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}", refresh=False)
                window = {k: [] for k in window}
                wait_s, busy_t0 = 0.0, time.perf_counter()
            if stop or step % t.checkpoint_every == 0 or step == t.steps:
                _save(job, run)
            if evaluator:
                final.update(evaluator.evaluate(ema, step, final=step == t.steps))
            if stop and step < t.steps:  # a signal during the last step: the job is done, not preempted
                raise Preempted(f"checkpointed at step {step} on signal {int(PREEMPT_SIGNAL)}", flag.previous)
        start_train_s = spent.wall_s - start_train_s
        if evaluator and evaluator.owed(step):  # trained before this start, but its end-of-run evaluation failed
            log.info("step %d is the last: the end-of-run evaluation the run still owes", step)
            if not evaluator.diagnostics:
                last.update(evaluator.diagnose(ema, step))
            final.update(evaluator.evaluate(ema, step, final=True))
        if evaluator and step >= t.steps:
            final.update(evaluator.record_time(step, start_train_s))
    finally:
        bar.close()
        if step >= t.steps:  # finished: a time-limit signal from now on has nothing to save, and must not end
            signal.signal(PREEMPT_SIGNAL, signal.SIG_IGN)  # the finished job as killed (or requeue it)
        else:
            signal.signal(PREEMPT_SIGNAL, flag.previous if flag.previous is not None else signal.SIG_DFL)
    return {**last, **final, "step": step, "train_seconds": spent.wall_s, "train_cpu_seconds": spent.cpu_s,
            "precision": precision}


def _summarise(window: dict, num_timesteps: int, opt, elapsed: float, wait_s: float, global_batch: int) -> dict:
    loss, mse, t = (torch.cat(window[k]) for k in ("loss", "mse", "t"))
    steps = len(window["grad_norm"])
    out = {"loss": loss.mean().item(), "mse": mse.mean().item(),
           "grad_norm": sum(window["grad_norm"]) / steps, "lr": opt.param_groups[0]["lr"],
           "images_per_s": steps * global_batch / max(elapsed, 1e-9),
           "data_wait_fraction": wait_s / max(elapsed, 1e-9)}
    out.update(quartile_means(loss, t, num_timesteps, "loss"))
    out.update(quartile_means(mse, t, num_timesteps, "mse"))
    if window.get("vb"):  # the learned variance's VLB term (recipe adm)
        out["vb"] = torch.cat(window["vb"]).mean().item()
    return out


def _save(job: _Job, run: TrainState) -> None:
    cfg = job.cfg
    if job.dist.is_main:
        train_checkpoints.save(cfg.run_root, run.checkpoint(cfg, job.card, job.tracker.run_id if job.tracker else None),
                               cfg.storage, keep=cfg.train.keep_checkpoints)
        job.tracker.set_tag("checkpoint", join(cfg.run_root, "checkpoints"))
    distributed.barrier(job.dist)
