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
from dataclasses import dataclass
from typing import IO, Iterator, Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from rcdm.redaction import split_userinfo
from rcdm.tars import DEFAULT_MAX_MEMBER_BYTES, read_samples


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


@contextlib.contextmanager
def atomic_open(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """Write ``path`` so that it appears only complete.

    Local: a temporary name in the same folder, fsync, then rename over the final name. Object stores
    (S3): the bytes are gathered in memory and uploaded in one call once complete; an object becomes
    visible only when its upload completes.
    """
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        buf = io.BytesIO()  # nothing reaches the store unless the body finishes without an exception
        yield buf
        fs.pipe_file(path, buf.getvalue())


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
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def recorded_run_id(url: str, storage: StorageOptions | None = None) -> str | None:
    """The MLflow run id a run file (``mlflow_run.json``, ``parent_run.json``) records; None if there is none."""
    fs, path = open_fs(url, storage)
    return read_json(fs, path)["run_id"] if fs.exists(path) else None


def tar_samples(fileobj, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of a WebDataset tar read as a stream, in order; the members of a sample
    are consecutive. Keys keep their folder (``a/b/k.jpg`` -> ``a/b/k``); extensions are lower case. For tars
    that must hold nothing but samples (rcdm's own shards): a member that is not a plain file of at most
    ``max_member_bytes``, a repeated member or a cut tar raises ``ValueError`` (rcdm.tars judges them)."""
    for sample in read_samples(fileobj, max_member_bytes):
        if sample.problems:
            raise ValueError(f"sample {sample.key}: {sample.problems[0]}")
        yield sample.key, sample.members


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
