"""The bridge between Hydra configs and the typed library: config -> TrainConfig, and the sweep
callback that runs in the launching process before any job is submitted (build the demo data if it
is missing, refuse jobs the dataset cannot serve, open the sweep's parent MLflow run) and after the
last one (close the parent run)."""
from __future__ import annotations

import atexit
import itertools
import logging
import signal
import sys
import threading
from typing import Any, NoReturn

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rcdm.data import open_dataset
from rcdm.errors import UserError
from rcdm.storage import join, open_fs, read_json, recorded_run_id, write_json
from rcdm.tracking import PARENT_TAG, Tracker
from rcdm.train import TrainConfig
from sharding.config import storage_from_cfg as storage_options

log = logging.getLogger("rcdm.sweep")


def sweep_root(cfg: DictConfig) -> str:
    return join(str(cfg.storage.run_root), str(cfg.experiment), str(cfg.sweep_id))


def parent_run_file(cfg: DictConfig) -> str:
    return join(sweep_root(cfg), "parent_run.json")


def train_config(cfg: DictConfig) -> TrainConfig:
    t = cfg.train
    resolved = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                for k, v in cfg.items() if k != "hydra"}  # the job's own config, without Hydra's
    return TrainConfig(
        data_url=str(cfg.data.url), encoder=cfg.encoder.name, level=cfg.level.name,
        run_root=join(sweep_root(cfg), str(cfg.job_name)), preset=cfg.model.name, split=cfg.data.split,
        heldout_split=cfg.data.heldout_split, steps=t.steps, batch_size=t.batch_size, lr=t.lr,
        weight_decay=t.weight_decay, ema_decay=t.ema_decay, grad_clip=t.grad_clip, schedule=cfg.diffusion.schedule,
        diffusion_steps=cfg.diffusion.steps, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints, sample_every=t.sample_every, grid_images=cfg.grid.images,
        grid_samples=cfg.grid.samples, grid_steps=str(cfg.grid.steps),
        faithfulness_images=cfg.faithfulness.images, faithfulness_steps=str(cfg.faithfulness.steps),
        loader_workers=t.loader_workers, seed=t.seed,
        device=cfg.device, compile=t.compile, storage=storage_options(cfg), tracking_uri=str(cfg.tracking.uri),
        experiment=str(cfg.experiment), run_name=str(cfg.job_name), parent_run_file=parent_run_file(cfg),
        config=resolved)


def ensure_demo_data(cfg: DictConfig) -> None:
    """Build the embedded demo dataset (both splits) where the config asks for it and it is missing."""
    d = cfg.data
    if not d.get("build_if_missing"):
        return
    fs, root = open_fs(str(d.url), storage_options(cfg))
    manifest = read_json(fs, join(root, "manifest.json")) if fs.exists(join(root, "manifest.json")) else None
    from sharding.encode import ShardJob
    from sharding.run import shard

    if manifest:  # a demo built earlier with other encoder weights would silently mix two encoders
        from rcdm.encoders import build_encoder

        for name in d.synthetic.encoders:
            want = build_encoder(name, d.synthetic.arch, str(d.synthetic.encoder_weights)).describe()["sha256"]
            have = manifest["encoders"].get(name, {}).get("sha256")
            if have and have != want:
                raise UserError(f"the demo dataset at {d.url} was embedded with other {name} weights "
                                f"({manifest['encoders'][name].get('weights')}) than data.synthetic.encoder_weights="
                                f"{d.synthetic.encoder_weights}; delete {d.url} to rebuild it, or set "
                                f"data.synthetic.encoder_weights to match")
    for split, count in d.synthetic.counts.items():
        if manifest and split in manifest["splits"]:
            continue
        log.info("building the demo dataset at %s (split %s, %d synthetic images)", d.url, split, count)
        shard(ShardJob(input="synthetic", output=str(d.url), split=split, synthetic_count=count,
                       synthetic_seed=d.synthetic.seed, encoders=list(d.synthetic.encoders), arch=d.synthetic.arch,
                       encoder_weights=str(d.synthetic.encoder_weights), image_size=d.synthetic.image_size,
                       shard_size=d.synthetic.shard_size, loader_workers=0, storage=storage_options(cfg)))


def _choices(overrides: list[str], group: str, default: str) -> list[str]:
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.get_key_element() == group:
            return [str(v) for v in o.sweep_iterator()] if o.is_sweep_override() else [str(o.value())]
    return [default]


def check_jobs(cfg: DictConfig) -> list[tuple[str, str]]:
    """Every (encoder, level) the sweep will run, checked against the dataset before submission."""
    task = list(cfg.hydra.overrides.task)
    combos = list(itertools.product(_choices(task, "encoder", cfg.encoder.name), _choices(task, "level", cfg.level.name)))
    for encoder, level in combos:
        open_dataset(str(cfg.data.url), encoder, level, cfg.data.split, storage_options(cfg))  # raises a UserError
    return combos


def _refuse(e: UserError) -> NoReturn:
    # Hydra turns a callback's exception into a warning and goes on launching jobs: stop here instead.
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _exit_on_sigterm() -> None:
    """SIGTERM ends the launcher through SystemExit, so exit handlers (closing the parent run) still run."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class SweepCallback(Callback):
    """Runs in the launching process. Hydra calls on_multirun_end only when every job returned: when a job
    raises (the basic launcher re-raises it; submitit's raises on a failed job), on Ctrl-C or on SIGTERM the
    launcher exits without it, and an exit handler ends the parent run FAILED instead of leaving it RUNNING."""

    def __init__(self) -> None:
        self._open_parent: Tracker | None = None  # on the sweep's parent run, until it is ended

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            ensure_demo_data(config)
            check_jobs(config)
        except UserError as e:
            _refuse(e)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            ensure_demo_data(config)
            combos = check_jobs(config)
        except UserError as e:
            _refuse(e)
        tracker = Tracker(str(config.tracking.uri), str(config.experiment))
        run_file = parent_run_file(config)
        existing = recorded_run_id(run_file, storage_options(config))  # a re-launched sweep continues its run
        run_id = tracker.start(existing, f"sweep {config.sweep_id}",
                               {"sweep_id": str(config.sweep_id), "run_root": sweep_root(config),
                                "jobs": str(len(combos)), "kind": "sweep"},
                               {"sweep": {"overrides": " ".join(config.hydra.overrides.task)}})
        write_json(*open_fs(run_file, storage_options(config)), {"run_id": run_id})
        self._open_parent = tracker
        atexit.register(self._end_unfinished_parent)
        _exit_on_sigterm()
        print(f"sweep {config.sweep_id}: {len(combos)} jobs, parent MLflow run {run_id}; runs: {tracker.link()}",
              flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._open_parent is None:
            return
        tracker = self._parent_tracker()
        children = tracker.client.search_runs([tracker.experiment_id], f"tags.`{PARENT_TAG}` = '{tracker.run_id}'")
        ok = bool(children) and all(r.info.status == "FINISHED" for r in children)
        tracker.end("FINISHED" if ok else "FAILED")
        print(f"sweep {config.sweep_id}: {sum(r.info.status == 'FINISHED' for r in children)}/{len(children)} jobs "
              f"finished; runs: {tracker.link()}", flush=True)

    def _parent_tracker(self) -> Tracker:
        """The tracker on the parent run opened by on_multirun_start; the run counts as closed from here on."""
        tracker, self._open_parent = self._open_parent, None
        return tracker

    def _end_unfinished_parent(self) -> None:
        if self._open_parent is None:
            return
        run_id = self._open_parent.run_id
        try:
            self._parent_tracker().end("FAILED")
            print(f"sweep parent MLflow run {run_id} ended FAILED: the launcher stopped before every job returned "
                  "(jobs already submitted to a cluster carry on and log to their own runs)", file=sys.stderr,
                  flush=True)
        except Exception as e:  # the tracking server may be what failed; never hide the original error
            print(f"warning: could not end the sweep's parent MLflow run {run_id}: {e}", file=sys.stderr, flush=True)
