"""The dataset manifest, the contract between sharding and everything that reads a dataset (DESIGN.md).

Written last by the sharding stage (its presence means the dataset is complete), read here by every
consumer. Version 1 (rcdm 0.1) recorded an encoder's weights as one string beside its sha256; it is
read into the same records.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from rcdm.encoders import WeightsRecord
from rcdm.errors import UserError
from rcdm.storage import StorageOptions, join, open_fs, read_json, write_json

FORMAT_VERSION = 2
MANIFEST = "manifest.json"


@dataclass
class EncoderRecord:
    """One encoder of a dataset: its levels' dims, weights, exact input preprocessing, the splits it covers."""

    arch: str
    levels: dict[str, int]
    weights: WeightsRecord
    preprocess: dict
    splits: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"arch": self.arch, "levels": dict(self.levels), "weights": self.weights.to_dict(),
                "preprocess": self.preprocess, "splits": list(self.splits)}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> EncoderRecord:
        weights = WeightsRecord.from_recorded(d["weights"], name, d.get("sha256"))
        return cls(d["arch"], dict(d["levels"]), weights, d["preprocess"], list(d.get("splits", [])))


@dataclass
class SplitRecord:
    count: int
    shards: list[dict]  # [{"name": "<split>-NNNNNN.tar", "count": n}] in order
    source: dict
    rejected: dict  # {"count": n, "file": "<split>-rejected.jsonl"}

    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.shards if s["count"] > 0]


@dataclass
class Manifest:
    image_size: int
    image_format: str  # png | jpg
    flip: bool  # mirrored-view embeddings exist
    splits: dict[str, SplitRecord] = field(default_factory=dict)
    encoders: dict[str, EncoderRecord] = field(default_factory=dict)
    created: str = ""
    code_version: str = ""

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "image_size": self.image_size, "image_format": self.image_format,
                "flip": self.flip, "created": self.created, "code_version": self.code_version,
                "splits": {k: vars(v) for k, v in self.splits.items()},
                "encoders": {k: v.to_dict() for k, v in self.encoders.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        if d.get("format_version", 1) > FORMAT_VERSION:
            raise UserError(f"dataset manifest format {d['format_version']} is newer than this rcdm reads "
                            f"({FORMAT_VERSION}); upgrade rcdm")
        return cls(d["image_size"], d["image_format"], bool(d["flip"]),
                   {k: SplitRecord(**v) for k, v in d["splits"].items()},
                   {k: EncoderRecord.from_dict(k, v) for k, v in d["encoders"].items()},
                   d.get("created", ""), d.get("code_version", ""))

    def digest(self) -> str:
        """sha256 of the manifest's canonical JSON: the identity of the dataset (its shards, counts and the
        encoder weights that embedded it), recorded on every run."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def describe_contents(self) -> str:
        encs = ", ".join(f"{n} [{', '.join(sorted(e.levels))}]" for n, e in sorted(self.encoders.items()))
        return f"encoders: {encs}; splits: {', '.join(sorted(self.splits))}"


def read_manifest(url: str, storage: StorageOptions | None = None) -> Manifest | None:
    """The manifest of the dataset at ``url``, or None where there is none (an incomplete dataset)."""
    fs, root = open_fs(url, storage)
    path = join(root, MANIFEST)
    return Manifest.from_dict(read_json(fs, path)) if fs.exists(path) else None


def write_manifest(url: str, manifest: Manifest, storage: StorageOptions | None = None) -> None:
    """Atomically: the dataset at ``url`` is complete from this moment."""
    fs, root = open_fs(url, storage)
    write_json(fs, join(root, MANIFEST), manifest.to_dict())
