"""Publishing a split: check every part's shards, then write the manifest (rcdm.manifest) last."""
from __future__ import annotations

import datetime as dt
import json

from rcdm.encoders import recorded_weights
from rcdm.errors import UserError
from rcdm.manifest import EncoderRecord, Manifest, SplitRecord, read_manifest, write_manifest
from rcdm.provenance import code_version
from rcdm.storage import atomic_open, join, open_fs, read_json
from sharding.config import ShardJob
from sharding.writer import progress_path, shard_name

REJECTED = "rejected.jsonl"


class IncompleteDataset(UserError):
    """Some shards are missing or out of step; rerun the same command to complete them."""


class TooManyRejected(UserError):
    """More inputs failed than the run allows; nothing is published as complete."""


def check_compatible(existing: Manifest | None, image_size: int, image_format: str, flip: bool) -> None:
    """A dataset grows (new encoders, new splits) only with the same image settings."""
    if existing is None:
        return
    have = (existing.image_size, existing.image_format, existing.flip)
    if have != (image_size, image_format, flip):
        raise UserError(f"the output already holds a dataset with image_size={have[0]}, image_format={have[1]}, "
                        f"flip={have[2]}; use those settings or another output")


def collect_split(fs, root: str, split: str, num_tasks: int, shard_sets: list[str]
                  ) -> tuple[list[dict], list[dict], dict[str, EncoderRecord]]:
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
        shards.append({"name": shard_name(split, i), "count": records["images"]["count"],
                       "sha256": {s: r["sha256"] for s, r in records.items() if "sha256" in r}})
        rejected += records["images"].get("rejected", [])
        for s, r in records.items():
            if s == "images":
                continue
            desc = r["encoder"]
            rec = EncoderRecord(desc["arch"], desc["dims"], recorded_weights(desc["weights"], s),
                                desc["preprocess"], [split])
            first = encoders.setdefault(s, rec)
            if (first.weights.sha256, first.arch) != (rec.weights.sha256, rec.arch):
                raise IncompleteDataset(f"{s}/{shard_name(split, i)} was written with other weights than "
                                        f"{s}/{shard_name(split, 0)}; delete the {s} shards and rerun")
    if missing:
        raise IncompleteDataset(f"{len(missing)} shard(s) not complete (first: {missing[0]}); "
                                f"rerun the same command to finish them")
    return shards, rejected, encoders


def finalize(job: ShardJob, num_tasks: int, source: dict) -> Manifest:
    """Check every part of ``job``'s ``num_tasks`` tasks, then write the rejected list and, last, the manifest
    (merged with an existing one); ``source``: the input's description the split records."""
    url, storage, split, levels = job.output, job.storage, job.split, job.levels
    image_size, image_format, flip = job.image_size, job.image_format, job.flip
    fs, root = open_fs(url, storage)
    existing = read_manifest(url, storage)
    check_compatible(existing, image_size, image_format, flip)
    shards, rejected, encoders = collect_split(fs, root, split, num_tasks, ["images", *job.encoders])
    count = sum(s["count"] for s in shards)
    total = count + len(rejected)
    if total == 0:
        raise UserError("the input holds no samples")
    if len(rejected) / total > job.max_rejected_fraction:
        reasons = sorted({r["reason"].split(":")[0] for r in rejected})[:5]
        raise TooManyRejected(f"{len(rejected)} of {total} inputs were rejected ({', '.join(reasons)}), more than "
                              f"max_rejected_fraction={job.max_rejected_fraction}; fix the input or raise the limit. "
                              f"No manifest was written.")
    manifest = existing or Manifest(image_size, image_format, flip)
    prior = manifest.splits.get(split)
    if prior and prior.count != count:
        raise IncompleteDataset(f"split {split} had {prior.count} samples and now {count}: the input changed; "
                                f"write to a new output")
    if prior:  # an encoder added to a split: the other shard sets' checksums stay as recorded
        for new, old in zip(shards, prior.shards):
            new["sha256"] = {**old.get("sha256", {}), **new["sha256"]}
    manifest.splits[split] = SplitRecord(count, shards, source, {"count": len(rejected), "file": f"{split}-{REJECTED}"})
    for name, rec in encoders.items():
        old = manifest.encoders.get(name)
        if old and (old.weights.sha256, old.arch) != (rec.weights.sha256, rec.arch):
            raise UserError(f"encoder {name} in this dataset used other weights ({old.weights}); "
                            f"write to a new output")
        rec.levels = {**(old.levels if old else {}), **{lv: rec.levels[lv] for lv in levels}}
        rec.splits = sorted(set(old.splits if old else []) | {split})
        manifest.encoders[name] = rec
    manifest.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest.code_version = code_version()
    with atomic_open(fs, join(root, f"{split}-{REJECTED}")) as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected).encode())
    write_manifest(url, manifest, storage)  # last: its presence means complete
    return manifest
