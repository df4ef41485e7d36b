"""The sweep's glue between the stages, in the launching process: before any job is submitted, build the
demo dataset with the sharding stage if it is missing, refuse jobs the dataset cannot serve and open the
sweep's parent MLflow run; after the last one, close it and write the sweep report. Also the composed
config -> ``TrainConfig``."""
from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from pipeline.guard import GuardCallback, masked_error

from rcdm.config import TrackingConfig, TrainConfig
from rcdm.data import open_dataset
from rcdm.encoders import build_encoder
from rcdm.encoders.zoo import EARLIER_TINY, shipped_version
from rcdm.errors import UserError
from rcdm.lease import Lease, LeaseHeld, describe
from rcdm.manifest import read_manifest
from rcdm.redaction import scrub
from rcdm.report import ReportConfig, write_report
from rcdm.report.collect import child_runs
from rcdm.storage import atomic_open, join, open_fs, recorded_run_id, write_json
from rcdm.tracking import Tracker, check_reachable
from sharding.config import ShardJob, SyntheticInput
from sharding.orchestrate import shard

log = logging.getLogger("rcdm.sweep")


def train_config(cfg: DictConfig) -> TrainConfig:
    """The composed job config as the typed object ``train`` takes (Hydra's own ``hydra`` node left out)."""
    if "hydra" in cfg:  # a callback's or a test's config: typed again without that node
        fields = list(TrainConfig.__dataclass_fields__)
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.masked_copy(cfg, fields))
    return OmegaConf.to_object(cfg)


def ensure_demo_data(cfg: TrainConfig) -> None:
    """Build the embedded demo dataset (both splits) where the config asks for it and it is missing."""
    d = cfg.data
    if not d.build_if_missing:
        return
    manifest = read_manifest(d.url, cfg.storage)
    if manifest:  # a demo built earlier with other encoder weights would silently mix two encoders
        for name in d.synthetic.encoders:
            want = build_encoder(name, d.synthetic.arch, d.synthetic.encoder_weights).weights
            have = manifest.encoders.get(name)
            if have and have.weights.sha256 != want.sha256:
                earlier = shipped_version(name, have.weights.sha256) if d.synthetic.arch == "tiny" else None
                why = (f"the tiny {name} encoder an earlier rcdm shipped ({earlier}: {EARLIER_TINY[earlier]})"
                       if earlier in EARLIER_TINY else f"other {name} weights ({have.weights})")
                raise UserError(f"the demo dataset at {d.url} is stale: it was embedded with {why}, not those "
                                f"data.synthetic.encoder_weights={d.synthetic.encoder_weights} gives now; delete "
                                f"{d.url} to rebuild it (a few minutes), or set data.synthetic.encoder_weights to "
                                f"match")
    for split, count in d.synthetic.counts.items():
        if manifest and split in manifest.splits:
            continue
        log.info("building the demo dataset at %s (split %s, %d synthetic images)", d.url, split, count)
        shard(ShardJob(input="synthetic", output=d.url, split=split, synthetic=SyntheticInput(count, d.synthetic.seed),
                       encoders=list(d.synthetic.encoders), arch=d.synthetic.arch,
                       encoder_weights=d.synthetic.encoder_weights, image_size=d.synthetic.image_size,
                       shard_size=d.synthetic.shard_size, loader_workers=0, storage=cfg.storage))


def jobs_in_use(cfg: TrainConfig, combos: list[tuple[str, str]]) -> list[str]:
    """The jobs of ``combos`` whose run root another live launch holds (its lease), each with who holds it."""
    out = []
    for encoder, level in combos:
        name = f"{encoder}-{level}-{cfg.model.name}"  # configs/sweep.yaml's job_name
        holder = Lease(join(cfg.sweep_root, name), cfg.storage, cfg.train.lease_s).held_elsewhere()
        if holder:
            out.append(f"job {name} is trained by {describe(holder)}")
    return out


def _choices(overrides: list[str], group: str, default: str) -> list[str]:
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.get_key_element() == group:
            return [str(v) for v in o.sweep_iterator()] if o.is_sweep_override() else [str(o.value())]
    return [default]


def check_jobs(cfg: TrainConfig, overrides: list[str]) -> list[tuple[str, str]]:
    """Every (encoder, level) the sweep will run, checked against the dataset before submission."""
    combos = list(itertools.product(_choices(overrides, "encoder", cfg.encoder.name),
                                    _choices(overrides, "level", cfg.level.name)))
    for encoder, level in combos:
        open_dataset(cfg.data.url, encoder, level, cfg.data.split, cfg.storage)  # raises a UserError
    return combos


def probe_writable(url: str, storage) -> None:
    """Write and delete a small file under ``url``: an unwritable run root is refused before any run starts."""
    fs, root = open_fs(url, storage)
    probe = f"{root.rstrip('/')}/.rcdm-write-probe-{os.getpid()}"
    try:
        with atomic_open(fs, probe) as f:
            f.write(b"rcdm")
        fs.rm(probe)
    except (OSError, UserError) as e:
        raise UserError(f"cannot write under storage.run_root ({scrub(url)}): {scrub(str(e))}; give a folder or bucket "
                        f"you can write to") from None


def _prepare(config: DictConfig) -> tuple[TrainConfig, list[tuple[str, str]]]:
    """Before any job: the config is valid, the tracking server answers, the run root takes writes, the demo data
    exists, and every job's (encoder, level) is in the dataset."""
    cfg = train_config(config)
    check_reachable(cfg.tracking.uri)
    probe_writable(cfg.sweep_root, cfg.storage)
    ensure_demo_data(cfg)
    return cfg, check_jobs(cfg, list(config.hydra.overrides.task))


@contextlib.contextmanager
def stop_on_error(what: str):
    """Hydra turns a callback's exception into a warning and goes on launching jobs (without their checks or
    their parent run): any failure here stops the sweep instead, with one line (and, for a bug, the masked
    traceback)."""
    try:
        yield
    except UserError as e:
        print(f"error: {scrub(str(e))}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Exception as e:  # noqa: BLE001 - every kind stops the sweep
        print(f"{masked_error(e)}\nerror: {what} failed ({type(e).__name__}: {scrub(str(e))}); nothing was "
              f"launched", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _exit_on_sigterm() -> None:
    """SIGTERM ends the launcher through SystemExit, so exit handlers (closing the parent run) still run."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class SweepCallback(GuardCallback):
    """Runs in the launching process. Hydra calls on_multirun_end only when every job returned: when a job
    raises (the basic launcher re-raises it; submitit's raises on a failed job), on Ctrl-C or on SIGTERM the
    launcher exits without it, and an exit handler ends the parent run FAILED instead of leaving it RUNNING."""

    def __init__(self) -> None:
        self._open_parent: Tracker | None = None  # on the sweep's parent run, until it is ended
        self._config: DictConfig | None = None
        self._shared = False  # a job was refused: another launch of this sweep trains it, and owns the parent run

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        super().on_run_start(config)
        with stop_on_error("the job's checks"):
            _prepare(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        super().on_multirun_start(config)
        with stop_on_error("the sweep's set-up"):
            self._open_sweep(config)

    def _open_sweep(self, config: DictConfig) -> None:
        cfg, combos = _prepare(config)
        busy = jobs_in_use(cfg, combos)
        if busy:
            raise UserError(f"this sweep is running in another launch: {'; '.join(busy)[:600]}. Nothing was started "
                            f"and the sweep's parent run is left as it is: wait for that launch to end, or follow it "
                            f"in MLflow; give a new sweep_id to train beside it")
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
        existing = recorded_run_id(cfg.parent_run_file, cfg.storage)  # a re-launched sweep continues its run
        run_id = tracker.start(existing, f"sweep {cfg.sweep_id}",
                               {"sweep_id": cfg.sweep_id, "run_root": cfg.sweep_root, "jobs": str(len(combos)),
                                "kind": "sweep"},
                               {"sweep": {"overrides": json.dumps(list(config.hydra.overrides.task))}})
        try:
            write_json(*open_fs(cfg.parent_run_file, cfg.storage), {"run_id": run_id})
        except BaseException:
            with contextlib.suppress(Exception):
                tracker.end("FAILED")  # never left RUNNING
            raise
        self._open_parent, self._config = tracker, config
        atexit.register(self._end_unfinished_parent)
        _exit_on_sigterm()
        print(f"sweep {config.sweep_id}: {len(combos)} jobs, parent MLflow run {run_id}; runs: {tracker.link()}",
              flush=True)  # link() masks credentials in the tracking URI

    def on_job_end(self, config: DictConfig, job_return, **kwargs: Any) -> None:
        if isinstance(job_return._return_value, LeaseHeld):  # another launch took a job between the check and now
            self._shared = True
        super().on_job_end(config, job_return, **kwargs)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._open_parent is None:
            return
        tracker = self._parent_tracker()
        if config.cluster.name == "slurm" and not config.cluster.wait:  # the jobs run on; status.py ends the run
            where = " ".join(config.hydra.overrides.task)
            print(f"sweep {config.sweep_id}: jobs submitted, recorded in {scrub(train_config(config).submitted_file)}; "
                  f"parent MLflow run {tracker.run_id} stays RUNNING. Follow it (and end it with its report once every job is done) with the same overrides:\n"
                  f"  python launch/status.py {scrub(where)}", flush=True)
            return
        children = child_runs(tracker.client, tracker.client.get_run(tracker.run_id))
        ok = bool(children) and all(r.info.status == "FINISHED" for r in children)
        tracker.end("FINISHED" if ok else "FAILED")
        print(f"sweep {config.sweep_id}: {sum(r.info.status == 'FINISHED' for r in children)}/{len(children)} jobs "
              f"finished; runs: {tracker.link()}", flush=True)
        report_sweep(TrackingConfig(config.tracking.uri, config.tracking.experiment), config.sweep_id, tracker.run_id)

    def _parent_tracker(self) -> Tracker:
        """The tracker on the parent run opened by on_multirun_start; the run counts as closed from here on."""
        tracker, self._open_parent = self._open_parent, None
        return tracker

    def _end_unfinished_parent(self) -> None:
        if self._open_parent is None:
            return
        run_id = self._open_parent.run_id
        if self._shared:
            self._open_parent = None
            print(f"sweep parent MLflow run {run_id} is left RUNNING: another launch of this sweep trains one of its "
                  f"jobs and ends it", file=sys.stderr, flush=True)
            return
        try:
            self._parent_tracker().end("FAILED")
            print(f"sweep parent MLflow run {run_id} ended FAILED: the launcher stopped before every job returned "
                  "(jobs already submitted to a cluster carry on and log to their own runs)", file=sys.stderr,
                  flush=True)
        except Exception as e:  # the tracking server may be what failed; never hide the original error
            print(f"warning: could not end the sweep's parent MLflow run {run_id}: {scrub(str(e))}", file=sys.stderr,
                  flush=True)
            return
        report_sweep(TrackingConfig(self._config.tracking.uri, self._config.tracking.experiment), self._config.sweep_id,
                run_id)


def report_sweep(tracking: TrackingConfig, sweep_id: str, parent_run_id: str) -> None:
    """The sweep report (rcdm.report) on the parent run; a report that fails never fails the sweep."""
    try:
        out = write_report(ReportConfig(tracking=tracking, sweep_id=sweep_id, run_id=parent_run_id))
        print(f"sweep {sweep_id}: report {out['html']}; in MLflow: {out['link']}", flush=True)
    except Exception as e:
        print(f"warning: the sweep report was not written ({type(e).__name__}: {scrub(str(e))}); write it with: python "
              f"launch/report.py tracking.experiment={tracking.experiment} sweep_id={sweep_id} "
              f"tracking.uri={scrub(tracking.uri)}", file=sys.stderr, flush=True)
