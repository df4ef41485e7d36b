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
import posixpath
from dataclasses import dataclass, field
from typing import Iterator

from braceexpand import braceexpand
from PIL import Image

from rcdm import synthetic
from rcdm.errors import UserError
from rcdm.storage import StorageOptions, open_fs, tar_samples

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


@dataclass
class Record:
    key: str
    meta: dict
    data: bytes | None = None  # raw file bytes, decoded by the worker
    image: Image.Image | None = None  # already an RGB image (synthetic)
    label: int | None = None


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


class FolderSource:
    kind = "folder"

    def __init__(self, url: str, split: str, shard_size: int, storage: StorageOptions):
        self.url, self.split, self.shard_size, self.storage = url, split, shard_size, storage
        fs, root = open_fs(url, storage)
        if not fs.isdir(root):
            raise UserError(f"input {url} is not a folder; give a folder, WebDataset tars or input=synthetic")
        files = sorted(p for p in fs.find(root) if not posixpath.basename(p).startswith("."))
        if not files:
            raise UserError(f"input folder {url} holds no files")
        self.root = root
        self.files = [posixpath.relpath(p, root) for p in files]
        # ImageNet layout: every file sits one folder deep; that folder's name is the class
        parents = {posixpath.dirname(f) for f in self.files}
        self.classes = sorted(parents) if "" not in parents and all("/" not in p for p in parents) else []

    def tasks(self) -> list[Task]:
        numbered = list(enumerate(self.files))
        return [Task(i, numbered[s:s + self.shard_size]) for i, s in enumerate(range(0, len(numbered), self.shard_size))]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "files": None}  # workers get their files through their tasks

    def records(self, task: Task) -> Iterator[Record]:
        fs, _ = open_fs(self.url, self.storage, fresh=True)
        for i, rel in task.items:
            meta = {"source": posixpath.join(self.url, rel)}
            label = None
            if self.classes:
                meta["label"] = posixpath.dirname(rel)
                label = self.classes.index(meta["label"])
            try:
                data = fs.cat_file(posixpath.join(self.root, rel))
            except OSError as e:
                data, meta["read_error"] = b"", str(e)
            yield Record(key=f"{self.split}_{i:08d}", meta=meta, data=data, label=label)

    def describe(self) -> dict:
        return {"kind": self.kind, "url": self.url, "files": len(self.files), "classes": len(self.classes)}


class TarSource:
    kind = "webdataset"

    def __init__(self, pattern: str, storage: StorageOptions):
        self.storage = storage
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
        url = task.items[0]
        fs, path = open_fs(url, self.storage, fresh=True)
        with fs.open(path, "rb") as f:
            for key, members in tar_samples(f):
                yield self._record(url, key, members)

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


def make_source(input: str, split: str, image_size: int, shard_size: int, storage: StorageOptions, synthetic):
    if input == "synthetic":
        return SyntheticSource(synthetic.count, synthetic.seed, split, image_size, shard_size)
    if input.endswith(".tar") or "{" in input or input.endswith((".tar}", ".tgz")):
        return TarSource(input, storage)
    fs, path = open_fs(input, storage)
    if not fs.exists(path):
        raise UserError(f"input {input} does not exist; give an image folder, WebDataset tars or input=synthetic")
    return FolderSource(input, split, shard_size, storage)

