"""What every launcher's Hydra run does so that no credential reaches disk or the console: the log guard from
the start, the configs Hydra saves masked as soon as they are written, and a failing job's overrides and
error masked before Hydra prints them (it writes "Error executing job with overrides: [...]" and the
exception to stderr itself, past any log handler). Each primary config lists ``GuardCallback`` (the sweep's
callback extends it)."""
from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rcdm.redaction import guard_logging, scrub
from rcdm.storage import write_local


class JobFailed(Exception):
    """A job's error as Hydra may print it: the original traceback, credentials masked. Picklable, so a SLURM
    job's result carries it back to the launching process as it is."""


def masked_error(e: BaseException) -> JobFailed:
    text = scrub("".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip())
    err = JobFailed(f"{type(e).__name__}: {scrub(str(e))}\n(the job's traceback, credentials masked)\n{text}")
    err.__suppress_context__ = True
    return err


def hydra_files(config: DictConfig) -> list[Path]:
    """The YAML Hydra has saved for this job (and for a multirun, the sweep's multirun.yaml)."""
    h = config.hydra
    out = list((Path(h.runtime.output_dir) / (h.output_subdir or ".hydra")).glob("*.yaml"))
    if str(h.mode) == "RunMode.MULTIRUN":
        out.append(Path(h.sweep.dir) / "multirun.yaml")
    return out


def scrub_files(paths: list[Path]) -> None:
    """Rewrite text files (Hydra's saved configs) with credentials masked, where they hold any."""
    for path in paths:
        if path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        clean = scrub(text)
        if clean != text:
            write_local(path, clean)


class GuardCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        guard_logging()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        guard_logging()  # the launcher logs each job's overrides next

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Hydra has just saved the job's config, its own config and the overrides: mask what they hold. If
        that fails the job must not run (Hydra would only warn): exit with the reason."""
        guard_logging()
        try:
            scrub_files(hydra_files(config))
        except Exception as e:  # noqa: BLE001 - any failure leaves credentials on disk
            print(f"error: could not mask credentials in Hydra's saved configs ({type(e).__name__}: {scrub(str(e))})",
                  file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Before anyone reads the result: Hydra prints ``job_return.overrides`` and raises its error."""
        job_return.overrides = [scrub(str(o)) for o in job_return.overrides or []]
        if job_return.status == JobStatus.FAILED and not isinstance(job_return._return_value, JobFailed):
            job_return.return_value = masked_error(job_return._return_value)
