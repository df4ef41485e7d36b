"""Any fsspec URL as a place to read and write: local paths and ``s3://`` (through s3fs) alike.

Credentials come from the usual AWS environment and config files; ``endpoint_url`` points s3fs at an
S3-compatible store (MinIO, a test server on 127.0.0.1, ...).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import secrets
from dataclasses import dataclass
from typing import IO, Iterator, Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from rcdm.errors import UserError
from rcdm.redaction import split_userinfo


@dataclass
class StorageOptions:
    """Where runs go and how to reach an object store (the ``storage`` config group). Credentials come
    from the AWS environment and ~/.aws, never from here."""

    run_root: Optional[str] = "runs"  # training checkpoints and grids: <run_root>/<tracking.experiment>/<sweep_id>/<job>
    endpoint_url: Optional[str] = None  # S3-compatible endpoint; None = AWS's; http://KEY:SECRET@host works too
    region: Optional[str] = None
    anon: bool = False

    def fsspec_kwargs(self, protocol: str) -> dict:
        if protocol not in ("s3", "s3a"):
            return {}
        endpoint, key, secret = split_userinfo(self.endpoint_url) if self.endpoint_url else (None, None, None)
        client = {k: v for k, v in {"endpoint_url": endpoint, "region_name": self.region}.items() if v}
        out = {"anon": self.anon, "client_kwargs": client} if client or self.anon else {}
        if key:  # http://KEY:SECRET@host: the store's credentials, used here and recorded nowhere
            out.update(key=key, secret=secret)
        return out


def open_fs(url: str, opts: StorageOptions | None = None, fresh: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for ``url``. ``fresh`` skips fsspec's instance cache: use it in a
    forked or spawned worker, where the parent's s3fs event loop cannot be used."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    kwargs = (opts or StorageOptions()).fsspec_kwargs(protocol)
    if fresh:
        kwargs["skip_instance_cache"] = True
    fs, path = fsspec.core.url_to_fs(url, **kwargs)
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def refuse_link(path: str) -> None:
    """A local file rcdm reads or writes in a run, sweep or dataset folder must not be a link: in a folder others can
    write to, a planted link would send the write (or the trust) somewhere else."""
    if os.path.islink(path):
        raise UserError(f"{path} is a symbolic link; rcdm never reads or writes its own files through a link (in a "
                        f"shared folder someone may have planted it): remove the link, or use a run or dataset folder "
                        f"only you can write to")


@contextlib.contextmanager
def atomic_open(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """Write ``path`` so that it appears only complete.

    Local: a new temporary file beside it, created exclusively under a random name and never through a link
    (``O_CREAT | O_EXCL | O_NOFOLLOW``: a name planted in a shared folder makes the write fail, never redirects
    it), fsync, then renamed over the final name, which must not be a link. Object stores (S3): the bytes are
    gathered in memory and uploaded in one call once complete; an object becomes visible only when its upload
    completes.
    """
    if is_local(fs):
        refuse_link(path)
        tmp = f"{path}.tmp-{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fd = os.open(tmp, flags, 0o666)  # 0o666 less the umask, as open() would give
        except (PermissionError, NotADirectoryError, FileExistsError, OSError) as e:
            raise UserError(f"cannot write {path} ({e.strerror or type(e).__name__}): give a folder you can write to "
                            f"(a run root, dataset or output folder)") from None
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            refuse_link(path)  # planted while the body ran
            os.replace(tmp, path)  # replaces a name; follows no link
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    else:
        buf = io.BytesIO()  # nothing reaches the store unless the body finishes without an exception
        yield buf
        fs.pipe_file(path, buf.getvalue())


def refuse_linked_entries(fs: fsspec.AbstractFileSystem, root: str, folders: tuple[str, ...] = ()) -> None:
    """Local only: no entry directly in ``root`` or in its sub-folders ``folders`` may be a link (``refuse_link``).
    A run folder's files and its ``checkpoints`` folder are rcdm's own; a link among them was planted."""
    if not is_local(fs) or not os.path.isdir(root):
        return
    for folder in ("", *folders):
        where = os.path.join(root, folder) if folder else root
        if folder:
            refuse_link(where)
        if os.path.isdir(where):
            for entry in os.scandir(where):
                refuse_link(entry.path)


def write_local(path: str | os.PathLike, data: bytes | str) -> None:
    """A local file written whole (``atomic_open``): never through a link, never half-written under its name."""
    with atomic_open(LocalFileSystem(), os.fspath(path)) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def remove_stale_temporaries(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """Delete the temporary files a killed writer left under ``root`` (local only: object stores
    never hold a partial object). Returns how many were removed."""
    if not is_local(fs) or not os.path.isdir(root):
        return 0
    stale = [p for p in fs.find(root) if ".tmp-" in os.path.basename(p)]
    for p in stale:
        os.unlink(p)
    return len(stale)


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj) -> None:
    with atomic_open(fs, path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str):
    if is_local(fs):
        refuse_link(path)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def recorded_run_id(url: str, storage: StorageOptions | None = None) -> str | None:
    """The MLflow run id a run file (``mlflow_run.json``, ``parent_run.json``) records; None if there is none."""
    fs, path = open_fs(url, storage)
    if not fs.exists(path):
        return None
    try:
        run_id = read_json(fs, path).get("run_id")
    except (ValueError, UnicodeDecodeError, AttributeError):
        run_id = None
    if not (isinstance(run_id, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id)):
        raise UserError(f"{url} does not hold an MLflow run id; it was altered or damaged: delete it (a new run is "
                        f"then opened) or restore it")
    return run_id


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes (sha256) and counts the bytes read through it: a shard's checksum costs
    no extra pass."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.sha256.update(data)
        self.bytes += n
        return n

    def drain(self) -> str:
        """Read to the end (a tar reader stops at its end marker) and return the hex digest of every byte."""
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()
