"""The dataset manifest, the contract between sharding and everything that reads a dataset (docs/architecture.md).

Written last by the sharding stage (its presence means the dataset is complete), read here by every
consumer. Version 1 (rcdm 0.1) recorded an encoder's weights as one string beside its sha256; it is
read into the same records.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from rcdm.encoders import WeightsRecord, recorded_weights
from rcdm.errors import UserError
from rcdm.storage import StorageOptions, join, open_fs, read_json, write_json

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a split or encoder: one folder name
# sha256 of the shard sharding writes for a task whose every input was rejected (a tar with no member)
# bounds on what a manifest may say, so a forged number cannot size a model or an image read: the largest released
# SSL embedding is 8192-d (VICReg's and Barlow Twins' projectors); a whitened 16384-d model holds a 1 GiB matrix
MAX_EMBED_DIM = 16384
MAX_IMAGE_SIZE = 4096
EMPTY_SHARD_SHA256 = "84ff92691f909a05b224e1c56abb4864f01b4f8e3c854e4bb4c7baf1d3f6d652"


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
        weights = recorded_weights(d["weights"], name, d.get("sha256"))
        return cls(d["arch"], dict(d["levels"]), weights, d["preprocess"], list(d.get("splits", [])))


@dataclass
class SplitRecord:
    count: int
    shards: list[dict]  # [{"name": "<split>-NNNNNN.tar", "count": n, "sha256": {shard set: hex}}] in order
    source: dict
    rejected: dict  # {"count": n, "file": "<split>-rejected.jsonl"}

    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.shards if s["count"] > 0]

    def entry(self, name: str) -> dict:
        return next(s for s in self.shards if s["name"] == name)


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
    def from_dict(cls, d: dict, where: str = "the manifest") -> Manifest:
        """A manifest read from someone's file, checked whole: a UserError names what is wrong and the fix."""
        if not isinstance(d, dict):
            raise _invalid(where, "it is not a JSON object")
        if not _int(d.get("format_version", 1)):
            raise _invalid(where, "its format_version is not a number")
        if d.get("format_version", 1) > FORMAT_VERSION:
            raise UserError(f"dataset manifest format {d['format_version']} is newer than this rcdm reads "
                            f"({FORMAT_VERSION}); upgrade rcdm")
        try:
            m = cls(d["image_size"], d["image_format"], d["flip"],
                    {k: SplitRecord(**v) for k, v in d["splits"].items()},
                    {k: EncoderRecord.from_dict(k, v) for k, v in d["encoders"].items()},
                    d.get("created", ""), d.get("code_version", ""))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise _invalid(where, f"{type(e).__name__}: {e}") from None
        m.check(where)
        return m

    def check(self, where: str = "the manifest") -> None:
        """Types, counts, dims and names: shard and encoder names must stay inside the dataset's folder."""
        if not (_int(self.image_size) and 8 <= self.image_size <= MAX_IMAGE_SIZE) \
                or self.image_format not in ("png", "jpg") \
                or not isinstance(self.flip, bool):
            raise _invalid(where, "image_size, image_format or flip has an impossible value")
        for split, rec in self.splits.items():
            if not NAME.match(split):
                raise _invalid(where, f"split name {split!r} is not one folder name")
            if not (_int(rec.count) and isinstance(rec.shards, list)):
                raise _invalid(where, f"split {split}: count or shards is not what a manifest holds")
            for sh in rec.shards:
                if not (isinstance(sh, dict) and isinstance(sh.get("name"), str) and _int(sh.get("count"))):
                    raise _invalid(where, f"split {split}: a shard entry {sh!r} lacks a name or a count")
                if not re.fullmatch(re.escape(split) + r"-\d{6}\.tar", sh["name"]):
                    raise _invalid(where, f"split {split}: shard name {sh['name']!r} is not {split}-NNNNNN.tar (a "
                                          f"shard must be a file of the dataset's own folders)")
                digests = sh.get("sha256", {})
                if not isinstance(digests, dict) or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                                                            for v in digests.values()):
                    raise _invalid(where, f"split {split}: shard {sh['name']} has a malformed sha256 record")
                if sh["count"] == 0 and any(v != EMPTY_SHARD_SHA256 for v in digests.values()):
                    raise _invalid(where, f"split {split}: shard {sh['name']} is listed as empty but its sha256 is not an "
                                          f"empty shard's")
            if len({sh["name"] for sh in rec.shards}) != len(rec.shards):
                raise _invalid(where, f"split {split}: a shard is listed twice")
            if sum(sh["count"] for sh in rec.shards) != rec.count:
                raise _invalid(where, f"split {split}: its shards hold {sum(sh['count'] for sh in rec.shards)} samples "
                                      f"but its count is {rec.count}")
        for name, enc in self.encoders.items():
            if not NAME.match(name) or name == "images":
                raise _invalid(where, f"encoder name {name!r} is not one folder name")
            if not enc.levels or not all(isinstance(k, str) and _int(v) and 0 < v <= MAX_EMBED_DIM
                                         for k, v in enc.levels.items()):
                raise _invalid(where, f"encoder {name}: levels {str(enc.levels)[:200]} are not dims from 1 to "
                                      f"{MAX_EMBED_DIM}")
            if not isinstance(enc.preprocess, dict) or any(sp not in self.splits for sp in enc.splits):
                raise _invalid(where, f"encoder {name}: its preprocessing or splits are not what a manifest holds")

    def digest(self) -> str:
        """sha256 of the manifest's canonical JSON: the identity of the dataset (its shards, counts and the
        encoder weights that embedded it), recorded on every run."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def describe_contents(self) -> str:
        encs = ", ".join(f"{n} [{', '.join(sorted(e.levels))}]" for n, e in sorted(self.encoders.items()))
        return f"encoders: {encs}; splits: {', '.join(sorted(self.splits))}"


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _invalid(where: str, what: str) -> UserError:
    return UserError(f"{where} is not a valid rcdm dataset manifest ({what}); it was damaged or altered: rebuild the "
                     f"dataset with launch/shard.py, or restore the manifest from a copy")


def read_manifest(url: str, storage: StorageOptions | None = None) -> Manifest | None:
    """The manifest of the dataset at ``url``, checked (``Manifest.check``), or None where there is none (an
    incomplete dataset)."""
    fs, root = open_fs(url, storage)
    path = join(root, MANIFEST)
    if not fs.exists(path):
        return None
    where = join(url, MANIFEST)
    try:
        d = read_json(fs, path)
    except (ValueError, UnicodeDecodeError) as e:
        raise _invalid(where, f"not JSON: {e}") from None
    return Manifest.from_dict(d, where)


def write_manifest(url: str, manifest: Manifest, storage: StorageOptions | None = None) -> None:
    """Atomically: the dataset at ``url`` is complete from this moment."""
    fs, root = open_fs(url, storage)
    write_json(fs, join(root, MANIFEST), manifest.to_dict())
