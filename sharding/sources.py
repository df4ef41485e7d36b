"""Inputs of the sharding stage, each cut into tasks (one task = one output shard, in a stable order).

- ``synthetic``: procedural images (``sharding/synthetic.py``), ``shard_size`` per task.
- an image folder (local or ``s3://``), listed recursively and sorted, ``shard_size`` files per task;
  ``<class>/<file>`` below the root (the ImageNet ``train/<wnid>/*.JPEG`` layout) yields labels.
- WebDataset tars (paths, brace patterns, globs, ``s3://`` URLs): one task per input tar, keys kept.

A record is (key, raw bytes or a ready image, metadata). Workers read through a fresh filesystem
instance of their own, so an s3fs event loop is never shared across processes.
"""
from __future__ import annotations

import json
import os
import posixpath
import stat
from dataclasses import dataclass, field
from typing import Iterator

from braceexpand import braceexpand
from PIL import Image

from rcdm import synthetic
from rcdm.errors import UserError
from rcdm.storage import StorageOptions, is_local, open_fs
from rcdm.tars import DEFAULT_MAX_MEMBER_BYTES, TruncatedTar, read_samples

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


@dataclass
class Record:
    key: str
    meta: dict
    data: bytes | None = None  # raw file bytes, decoded by the worker
    image: Image.Image | None = None  # already an RGB image (synthetic)
    label: int | None = None
    rejected: str | None = None  # judged before reading: why this input cannot be a sample


@dataclass
class Task:
    index: int  # output shard number
    items: list = field(default_factory=list)  # what the source needs to produce this shard's records


class SyntheticSource:
    kind = "synthetic"

    def __init__(self, count: int, seed: int, split: str, image_size: int, shard_size: int):
        self.count, self.seed, self.split, self.size, self.shard_size = count, seed, split, image_size, shard_size

    def tasks(self) -> list[Task]:
        idx = list(range(self.count))
        return [Task(i, idx[s:s + self.shard_size]) for i, s in enumerate(range(0, self.count, self.shard_size))]

    def records(self, task: Task) -> Iterator[Record]:
        for i in task.items:
            img, f = synthetic.sample(self.seed, self.split, i, self.size)
            yield Record(key=f"{self.split}_{i:08d}", image=img, label=synthetic.SHAPES.index(f["shape"]),
                         meta={"source": f"synthetic://{self.seed}/{self.split}/{i}", "factors": f,
                               "label": f["shape"]})

    def describe(self) -> dict:
        return {"kind": self.kind, "count": self.count, "seed": self.seed, "factors": {
            "shape": list(synthetic.SHAPES), "colour": list(synthetic.COLOURS),
            "background": list(synthetic.BACKGROUNDS), "scale": list(synthetic.SCALE_RANGE),
            "x": [0, 1], "y": [0, 1], "grayscale": [False, True]}}


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def list_local(root: str, max_bytes: int) -> list[tuple[str, str | None]]:
    """(path relative to ``root``, why it is rejected or None) of every entry below ``root``, hidden ones left
    out, judged by ``lstat`` without opening anything: FIFOs, devices and sockets are never read (reading a FIFO
    blocks forever), links are followed only to a regular file, folder links are not walked (a loop)."""
    out = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        dirs[:] = [d for d in dirs if d not in links]
        for name in sorted(files + links):
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            st = os.lstat(path)
            why = None
            if stat.S_ISLNK(st.st_mode):
                try:
                    st = os.stat(path)
                except OSError:
                    out.append((rel, "not read: a broken link"))
                    continue
                if not stat.S_ISREG(st.st_mode):
                    why = f"a link to {_kind(st.st_mode)}"
            elif not stat.S_ISREG(st.st_mode):
                why = _kind(st.st_mode)
            if why is None and st.st_size > max_bytes:
                why = f"{st.st_size} bytes, more than max_member_bytes={max_bytes}"
            out.append((rel, f"not read: {why}" if why else None))
    return sorted(out)


class FolderSource:
    kind = "folder"

    def __init__(self, url: str, split: str, shard_size: int, storage: StorageOptions,
                 max_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        self.url, self.split, self.shard_size, self.storage = url, split, shard_size, storage
        fs, root = open_fs(url, storage)
        if not fs.isdir(root):
            raise UserError(f"input {url} is not a folder; give a folder, WebDataset tars or input=synthetic")
        if is_local(fs):
            entries = list_local(root, max_bytes)
        else:  # an object store holds objects only; their sizes come with the listing
            found = fs.find(root, detail=True)
            entries = sorted((posixpath.relpath(p, root), None if d.get("size", 0) <= max_bytes else
                              f"not read: {d['size']} bytes, more than max_member_bytes={max_bytes}")
                             for p, d in found.items() if not posixpath.basename(p).startswith("."))
        if not entries:
            raise UserError(f"input folder {url} holds no files")
        self.root = root
        self.files = [rel for rel, _ in entries]
        self.problems = {rel: why for rel, why in entries if why}
        # ImageNet layout: every file sits one folder deep; that folder's name is the class
        parents = {posixpath.dirname(f) for f in self.files}
        self.classes = sorted(parents) if "" not in parents and all("/" not in p for p in parents) else []

    def tasks(self) -> list[Task]:
        numbered = [(i, rel, self.problems.get(rel)) for i, rel in enumerate(self.files)]
        return [Task(i, numbered[s:s + self.shard_size]) for i, s in enumerate(range(0, len(numbered), self.shard_size))]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "files": None, "problems": None}  # workers get their files through their tasks

    def records(self, task: Task) -> Iterator[Record]:
        fs, _ = open_fs(self.url, self.storage, fresh=True)
        for i, rel, why in task.items:
            meta = {"source": posixpath.join(self.url, rel)}
            label = None
            if self.classes:
                meta["label"] = posixpath.dirname(rel)
                label = self.classes.index(meta["label"])
            key = f"{self.split}_{i:08d}"
            if why:
                yield Record(key=key, meta=meta, label=label, rejected=why)
                continue
            try:
                data = fs.cat_file(posixpath.join(self.root, rel))
            except OSError as e:
                yield Record(key=key, meta=meta, label=label, rejected=f"unreadable: {e}")
                continue
            yield Record(key=key, meta=meta, data=data, label=label)

    def describe(self) -> dict:
        return {"kind": self.kind, "url": self.url, "files": len(self.files), "classes": len(self.classes)}


class TarSource:
    kind = "webdataset"

    def __init__(self, pattern: str, storage: StorageOptions, max_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        self.storage, self.max_bytes = storage, max_bytes
        urls = []
        for part in braceexpand(pattern):
            fs, path = open_fs(part, storage)
            matches = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
            if not matches or not all(fs.isfile(m) for m in matches):
                raise UserError(f"no WebDataset tar at {part}")
            proto = part.split("://", 1)[0] + "://" if "://" in part else ""
            urls += [proto + m if proto and not m.startswith(proto) else m for m in matches]
        self.urls = urls

    def tasks(self) -> list[Task]:
        return [Task(i, [u]) for i, u in enumerate(self.urls)]

    def records(self, task: Task) -> Iterator[Record]:
        """One record per sample of the tar; a sample with a member that is not a plain file of a sane size, with
        a repeated member, or whose key (sanitised into a file name) an earlier sample already took, is rejected
        with its reason; a tar cut short gives its samples before the cut and one rejected record naming it."""
        url = task.items[0]
        fs, path = open_fs(url, self.storage, fresh=True)
        taken: dict[str, str] = {}
        with fs.open(path, "rb") as f:
            try:
                for sample in read_samples(f, self.max_bytes):
                    rec = self._record(url, sample.key, sample.members)
                    if sample.problems:
                        rec.rejected = "; ".join(sample.problems)
                    elif rec.key in taken:
                        rec.rejected = (f"key {sample.key!r} becomes {rec.key!r}, which sample {taken[rec.key]!r} of "
                                        f"this tar already took")
                    else:
                        taken[rec.key] = sample.key
                    yield rec
            except TruncatedTar as e:
                yield Record(key=f"truncated_{len(taken):08d}", meta={"source": url}, rejected=f"{url}: {e}")

    @staticmethod
    def _record(url: str, key: str, members: dict[str, bytes]) -> Record:
        meta = {"source": f"{url}#{key}"}
        if "json" in members:
            try:
                meta["input_json"] = json.loads(members["json"])
            except ValueError:
                pass
        label = int(members["cls"].decode().strip()) if members.get("cls", b"").strip().isdigit() else None
        data = next((members[e] for e in WDS_IMAGE_EXTS if e in members), b"")
        return Record(key=key.replace("/", "_").replace(".", "_"), meta=meta, data=data, label=label)

    def describe(self) -> dict:
        return {"kind": self.kind, "tars": len(self.urls), "first": self.urls[0] if self.urls else None}


def make_source(input: str, split: str, image_size: int, shard_size: int, storage: StorageOptions, synthetic,
                max_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
    if input == "synthetic":
        return SyntheticSource(synthetic.count, synthetic.seed, split, image_size, shard_size)
    if input.endswith(".tar") or "{" in input or input.endswith((".tar}", ".tgz")):
        return TarSource(input, storage, max_bytes)
    fs, path = open_fs(input, storage)
    if not fs.exists(path):
        raise UserError(f"input {input} does not exist; give an image folder, WebDataset tars or input=synthetic")
    return FolderSource(input, split, shard_size, storage, max_bytes)

