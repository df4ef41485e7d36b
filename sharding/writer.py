"""Shard files: deterministic tars (fixed member order and metadata) written atomically, and the
per-shard completion records that make a rerun skip finished work."""
from __future__ import annotations

import hashlib
import io
import tarfile

import fsspec
import numpy as np

from rcdm.storage import atomic_open, join, write_json

PROGRESS_DIR = "_progress"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def npy_bytes(vec: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vec, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar of ``key.ext`` members in the given order; mtime, owner and mode fixed so that the same
    samples give the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uname = info.gname = "rcdm"
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def progress_path(root: str, shard_set: str, split: str, index: int) -> str:
    return join(root, PROGRESS_DIR, shard_set, shard_name(split, index).replace(".tar", ".json"))


def write_shard(fs: fsspec.AbstractFileSystem, root: str, shard_set: str, split: str, index: int,
                samples: list[tuple[str, dict[str, bytes]]], extra: dict | None = None) -> int:
    """Write ``<root>/<shard_set>/<split>-NNNNNN.tar``, then its completion record; returns bytes written."""
    data = tar_bytes(samples)
    with atomic_open(fs, join(root, shard_set, shard_name(split, index))) as f:
        f.write(data)
    keys = [k for k, _ in samples]
    write_json(fs, progress_path(root, shard_set, split, index),
               {"count": len(keys), "keys_sha256": keys_digest(keys), "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), **(extra or {})})
    return len(data)
