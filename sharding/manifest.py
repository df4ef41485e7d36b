"""The dataset manifest: written last, its presence means the dataset is complete (DESIGN.md)."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import fsspec

import rcdm
from rcdm.errors import UserError
from rcdm.storage import atomic_open, join, read_json, write_json
from sharding.writer import progress_path, shard_name

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"


class IncompleteDataset(UserError):
    """Some shards are missing or out of step; rerun the same command to complete them."""


class TooManyRejected(UserError):
    """More inputs failed than the run allows; nothing is published as complete."""


def code_version() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"rcdm {rcdm.__version__}" + (f" ({sha})" if sha else "")


def read_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict | None:
    path = join(root, MANIFEST)
    return read_json(fs, path) if fs.exists(path) else None


def check_compatible(existing: dict | None, image_size: int, image_format: str, flip: bool) -> None:
    """A dataset grows (new encoders, new splits) only with the same image settings."""
    if existing is None:
        return
    have = (existing["image_size"], existing["image_format"], existing["flip"])
    if have != (image_size, image_format, flip):
        raise UserError(f"the output already holds a dataset with image_size={have[0]}, image_format={have[1]}, "
                        f"flip={have[2]}; use those settings or another output")


def collect_split(fs, root: str, split: str, num_tasks: int, shard_sets: list[str]
                  ) -> tuple[list[dict], list[dict], dict[str, dict]]:
    """Per shard: its count and keys, checked across sets; every rejected input; and the description
    of each encoder as the parts that wrote its shards used it (weights, checksum, preprocessing)."""
    shards, rejected, missing, encoders = [], [], [], {}
    for i in range(num_tasks):
        records = {}
        for s in shard_sets:
            p = progress_path(root, s, split, i)
            if not fs.exists(p):
                missing.append(f"{s}/{shard_name(split, i)}")
                continue
            records[s] = read_json(fs, p)
        if len(records) < len(shard_sets):
            continue
        digests = {r["keys_sha256"] for r in records.values()}
        if len(digests) != 1:
            raise IncompleteDataset(f"shard {shard_name(split, i)} has different keys across {sorted(records)}; "
                                    f"delete those shards and rerun")
        shards.append({"name": shard_name(split, i), "count": records["images"]["count"]})
        rejected += records["images"].get("rejected", [])
        for s, r in records.items():
            if s == "images":
                continue
            first = encoders.setdefault(s, r["encoder"])
            if (first["sha256"], first["arch"]) != (r["encoder"]["sha256"], r["encoder"]["arch"]):
                raise IncompleteDataset(f"{s}/{shard_name(split, i)} was written with other weights than "
                                        f"{s}/{shard_name(split, 0)}; delete the {s} shards and rerun")
    if missing:
        raise IncompleteDataset(f"{len(missing)} shard(s) not complete (first: {missing[0]}); "
                                f"rerun the same command to finish them")
    return shards, rejected, encoders


def finalize(fs, root: str, split: str, num_tasks: int, encoder_names: list[str], levels: list[str],
             image_size: int, image_format: str, flip: bool, source: dict, max_rejected_fraction: float) -> dict:
    """Check every part, then write the rejected list and, last, the manifest (merged with an existing one)."""
    existing = read_manifest(fs, root)
    check_compatible(existing, image_size, image_format, flip)
    shards, rejected, encoders = collect_split(fs, root, split, num_tasks, ["images", *encoder_names])
    count = sum(s["count"] for s in shards)
    total = count + len(rejected)
    if total == 0:
        raise UserError("the input holds no samples")
    if len(rejected) / total > max_rejected_fraction:
        reasons = sorted({r["reason"].split(":")[0] for r in rejected})[:5]
        raise TooManyRejected(f"{len(rejected)} of {total} inputs were rejected ({', '.join(reasons)}), more than "
                              f"max_rejected_fraction={max_rejected_fraction}; fix the input or raise the limit. "
                              f"No manifest was written.")
    manifest = existing or {"format_version": FORMAT_VERSION, "image_size": image_size,
                            "image_format": image_format, "flip": flip, "splits": {}, "encoders": {}}
    prior = manifest["splits"].get(split, {})
    manifest["splits"][split] = {"count": count, "shards": shards, "source": source,
                                 "rejected": {"count": len(rejected), "file": f"{split}-{REJECTED}"}}
    if prior and prior.get("count") != count:
        raise IncompleteDataset(f"split {split} had {prior['count']} samples and now {count}: the input changed; "
                                f"write to a new output")
    for name, desc in encoders.items():
        levels_here = {lv: desc["dims"][lv] for lv in levels}
        old = manifest["encoders"].get(name)
        if old and (old["sha256"], old["arch"]) != (desc["sha256"], desc["arch"]):
            raise UserError(f"encoder {name} in this dataset used other weights ({old['weights']}); "
                            f"write to a new output")
        merged_levels = {**(old or {}).get("levels", {}), **levels_here}
        manifest["encoders"][name] = {"arch": desc["arch"], "levels": merged_levels, "weights": desc["weights"],
                                      "sha256": desc["sha256"], "preprocess": desc["preprocess"],
                                      "splits": sorted(set((old or {}).get("splits", [])) | {split})}
    manifest["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest["code_version"] = code_version()
    with atomic_open(fs, join(root, f"{split}-{REJECTED}")) as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected).encode())
    write_json(fs, join(root, MANIFEST), manifest)  # last: its presence means complete
    return manifest
