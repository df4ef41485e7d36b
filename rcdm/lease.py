"""One job trains in a run root at a time: a lease file ``<run root>/lease.json`` (host, pid, SLURM job id,
expiry) on any fsspec store, renewed by a background thread while the job runs and removed when it ends.

A second launch of the same job is refused with who holds the lease. A lease is taken over when it has
expired (its holder died without removing it), when its holder is a dead process on this host, or when it
is held by the same SLURM job (a requeue after preemption or a time limit restarts the job under its id).
On a local (or shared POSIX) filesystem the lease is created atomically: written whole under a private name, then
hard-linked to ``lease.json``, which fails when one exists; a stale one is first renamed aside, and only the launch
whose rename moved the very lease it judged stale goes on. Object stores have no atomic create-if-absent here, so
two launches in the same second can both write; each reads the lease back and the one whose token is not there
stops (the renewal thread checks it too). A lease file is someone else's word: a field that is not what rcdm
writes (an expiry that is not a finite time within a day, a pid that cannot be one) makes it no lease at all.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import threading
import time

from rcdm.errors import UserError
from rcdm.storage import StorageOptions, is_local, join, open_fs, read_json, write_json

log = logging.getLogger(__name__)
LEASE = "lease.json"


class LeaseHeld(UserError):
    """Another live launch trains in this run root."""


def slurm_job_id() -> str:
    """The id sacct knows this job by: ``<array>_<task>`` for an array task, else the job id ("" off SLURM)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def valid(holder, ttl_s: float) -> bool:
    """Whether ``holder`` is a lease as rcdm writes it: finite expiry at most a day (or one ``ttl_s``) ahead, a pid
    that can be one, text fields that are text."""
    if not isinstance(holder, dict):
        return False
    expires, pid = holder.get("expires"), holder.get("pid")
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
        return False
    if expires > time.time() + max(86400.0, ttl_s):
        return False
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 1 << 22):
        return False
    return all(isinstance(holder.get(k, ""), str) for k in ("host", "slurm_job_id", "token", "started"))


def describe(holder: dict) -> str:
    slurm = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    left = holder.get("expires", 0) - time.time()
    return (f"pid {holder.get('pid')} on {holder.get('host')}{slurm}, since {holder.get('started', '?')}, "
            f"expiring in {max(0, int(left))} s unless renewed")


class Lease:
    """``with Lease(run_root, storage, ttl_s):`` holds the run root for the block (``ttl_s`` 0: no lease)."""

    def __init__(self, run_root: str, storage: StorageOptions | None = None, ttl_s: float = 300.0):
        self.run_root, self.storage, self.ttl_s = run_root, storage, ttl_s
        self.fs, root = open_fs(run_root, storage)
        self.path = join(root, LEASE)
        self.token = secrets.token_hex(8)
        self.lost: str | None = None  # why the lease was lost while held (someone else took it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": slurm_job_id(), "token": self.token,
                "expires": time.time() + self.ttl_s, "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}

    def _read(self) -> dict | None:
        """The holder's record; None where there is no lease file, {} where it is not a valid lease."""
        if not self.fs.exists(self.path):
            return None
        try:
            holder = read_json(self.fs, self.path)
        except (ValueError, OSError, UnicodeDecodeError):
            return {}  # unreadable: nobody can prove they hold it
        return holder if valid(holder, self.ttl_s) else {}

    def _takes_over(self, holder: dict) -> str | None:
        """Why this process may take ``holder``'s lease, or None."""
        if not holder:
            return "no valid lease"
        if holder.get("token") == self.token:
            return "ours"
        if holder.get("slurm_job_id") and holder["slurm_job_id"] == slurm_job_id():
            return f"the same SLURM job ({holder['slurm_job_id']}) restarted"
        if float(holder.get("expires", 0)) < time.time():
            return "expired"
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                and not _alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        return None

    def held_elsewhere(self) -> dict | None:
        """The holder's record where another live launch holds this run root (one this process may not take
        over), else None. A look only: nothing is written."""
        if self.ttl_s <= 0:
            return None
        holder = self._read()
        return holder if holder is not None and self._takes_over(holder) is None else None

    def acquire(self) -> None:
        if self.ttl_s <= 0:
            return
        holder = self._read()
        why = "free" if holder is None else self._takes_over(holder)
        if why is None:
            raise LeaseHeld(f"{self.run_root} is in use by another launch of this job ({describe(holder)}); wait for "
                            f"it to end, or use another sweep_id; if that job is dead, delete "
                            f"{join(self.run_root, LEASE)}")
        if holder is not None:
            log.info("taking over the lease on %s (%s)", self.run_root, why)
        if is_local(self.fs):
            self._create_local(holder)
        else:
            write_json(self.fs, self.path, self._record())
            time.sleep(0.2)  # a launch writing at the same moment: the last write wins, the other one stops
        back = self._read() or {}
        if back.get("token") != self.token:
            raise UserError(f"{self.run_root} was taken by another launch of this job at the same moment "
                            f"({describe(back)}); use another sweep_id or wait for it to end")
        self._thread = threading.Thread(target=self._renew, name="rcdm-lease", daemon=True)
        self._thread.start()

    def _create_local(self, judged: dict | None) -> None:
        """Create ``lease.json`` atomically (a hard link of a complete private file fails where the name exists).
        ``judged``: the lease read and judged stale (None: there was none); it is first renamed aside, and where the
        file renamed is not that lease (another launch replaced it meanwhile), it is put back and this launch
        stops."""
        taken = UserError(f"{self.run_root} was taken by another launch of this job at the same moment; use another "
                          f"sweep_id or wait for it to end")
        if judged is not None:
            aside = f"{self.path}.stale-{self.token}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                raise taken from None  # another launch moved it first
            try:
                moved = read_json(self.fs, aside)
            except (ValueError, OSError, UnicodeDecodeError):
                moved = {}
            if (moved if valid(moved, self.ttl_s) else {}) != judged:  # we moved a fresh lease: give it back
                with contextlib.suppress(OSError):
                    os.link(aside, self.path)
                os.unlink(aside)
                raise taken
            os.unlink(aside)
        private = f"{self.path}.new-{self.token}"
        write_json(self.fs, private, self._record())
        try:
            os.link(private, self.path)
        except FileExistsError:
            raise taken from None
        finally:
            os.unlink(private)

    def _renew(self) -> None:
        period = max(1.0, self.ttl_s / 4)
        while not self._stop.wait(period):
            try:
                holder = self._read() or {}
                if holder.get("token") != self.token:
                    self.lost = f"the lease on {self.run_root} was taken by {describe(holder)}"
                    log.error("%s; this job stops at its next step", self.lost)
                    return
                write_json(self.fs, self.path, self._record())
            except Exception as e:  # noqa: BLE001 - a store hiccup: try again next period, until the expiry
                log.warning("could not renew the lease on %s: %s", self.run_root, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
            try:
                if (self._read() or {}).get("token") == self.token:
                    self.fs.rm(self.path)
            except Exception as e:  # noqa: BLE001 - it expires by itself
                log.warning("could not remove the lease on %s: %s", self.run_root, e)

    def check(self) -> None:
        """Raise where the lease was lost (called at step boundaries)."""
        if self.lost:
            raise UserError(f"{self.lost}; two launches of one job must not train in one folder: use another "
                            f"sweep_id")

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
