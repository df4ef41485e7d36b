"""One part of a sharding run: decode each image once (in DataLoader workers), run every requested
encoder x level on it and its mirror in the main process, write each finished shard."""
from __future__ import annotations

import io
import json
import logging
import time
from collections import defaultdict

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from rcdm.device import autocast, pick_device
from rcdm.encoders import build_encoder
from rcdm.preprocess import Preprocess, center_crop
from rcdm.storage import is_local, open_fs
from sharding.config import ShardJob
from sharding.decode import Rejected, decode
from sharding.sources import Task
from sharding.writer import npy_bytes, progress_path, write_shard

log = logging.getLogger(__name__)


class DecodedStream(IterableDataset):
    """Yields, per task in order, batches of dicts: one per input (decoded and cropped, or rejected),
    then a ``done`` marker. Each task is read whole by one worker, so a shard's order is the input's."""

    def __init__(self, source, tasks: list[Task], job: ShardJob, preprocs: list[Preprocess]):
        self.source, self.tasks, self.job, self.preprocs = source, tasks, job, preprocs

    def _encode_image(self, img) -> bytes:
        buf = io.BytesIO()
        crop = center_crop(img, self.job.image_size)
        if self.job.image_format == "png":
            crop.save(buf, format="PNG", optimize=False)
        else:
            crop.save(buf, format="JPEG", quality=self.job.jpeg_quality)
        return buf.getvalue()

    def _item(self, task: Task, rec) -> dict:
        if rec.rejected:
            return {"task": task.index, "key": rec.key, "rejected": rec.rejected, "source": rec.meta["source"]}
        try:
            img = rec.image if rec.image is not None else decode(rec.data, self.job.max_pixels)
        except Rejected as e:
            return {"task": task.index, "key": rec.key, "rejected": str(e), "source": rec.meta["source"]}
        meta = {**rec.meta, "original_size": list(img.size)}
        if rec.label is not None:
            meta["cls"] = rec.label
        return {"task": task.index, "key": rec.key, "image": self._encode_image(img),
                "json": json.dumps(meta, sort_keys=True).encode(), "cls": rec.label,
                "enc": [pp.crop_uint8(img) for pp in self.preprocs]}

    def __iter__(self):
        """Batches of ``batch_size`` consecutive inputs of one task, the last one ending with the task's
        ``done`` marker: the encoder sees the same batches whatever the number of workers, so the
        output bytes do not depend on it."""
        info = get_worker_info()
        mine = self.tasks[info.id::info.num_workers] if info else self.tasks
        for task in mine:
            batch = []
            for rec in self.source.records(task):
                batch.append(self._item(task, rec))
                if len(batch) == self.job.batch_size:
                    yield batch
                    batch = []
            yield batch + [{"task": task.index, "done": True}]


def _as_is(batch: list[dict]) -> list[dict]:
    return batch


def _embed(records: list[dict], encoders: dict, preprocs: list[Preprocess], levels: list[str], flip: bool,
           device: torch.device) -> list[dict[str, dict[str, bytes]]]:
    """Per record: {encoder: {"<level>.npy": ..., "<level>.flip.npy": ...}} as float16 npy bytes."""
    n = len(records)
    out: list[dict[str, dict[str, bytes]]] = [defaultdict(dict) for _ in range(n)]
    for pi, pp in enumerate(preprocs):
        x = pp.normalize_uint8(torch.stack([r["enc"][pi] for r in records]).to(device))  # [n, 3, S, S]
        if flip:
            x = torch.cat([x, x.flip(3)])  # the mirrored view, through the same forward
        with torch.no_grad(), autocast(device):
            for name, enc in encoders.items():
                if enc.preprocess != pp:
                    continue
                feats = enc(x)  # {level: [n or 2n, D]}; the projector reuses the trunk's output
                for level in levels:
                    v = feats[level].float().cpu().numpy()
                    for i in range(n):
                        out[i][name][f"{level}.npy"] = npy_bytes(v[i])
                        if flip:
                            out[i][name][f"{level}.flip.npy"] = npy_bytes(v[n + i])
    return out


def load_encoders(job: ShardJob, device: torch.device) -> dict:
    encs = {name: build_encoder(name, job.arch, job.encoder_weights, download=job.download).to(device)
            for name in job.encoders}
    if device.type == "cuda":
        encs = {k: e.to(memory_format=torch.channels_last) for k, e in encs.items()}
    return encs


def run_part(job: ShardJob, task_indices: list[int], part: int = 0) -> dict:
    """Write the missing shard sets of the given tasks; returns counts, bytes and seconds."""
    t0 = time.perf_counter()
    device = pick_device(job.device)
    source = job.source()
    all_tasks = source.tasks()
    tasks = [all_tasks[i] for i in task_indices]
    fs, root = open_fs(job.output, job.storage)
    needed = {t.index: [s for s in job.shard_sets() if not fs.exists(progress_path(root, s, job.split, t.index))]
              for t in tasks}
    tasks = [t for t in tasks if needed[t.index]]
    stats = {"images": 0, "rejected": 0, "bytes": 0, "shards": 0}
    if not tasks:
        return stats | {"seconds": time.perf_counter() - t0}
    encoders = load_encoders(job, device)
    preprocs = list(dict.fromkeys(e.preprocess for e in encoders.values()))  # distinct, in order
    remote = not is_local(fs) or "://" in job.input and not job.input.startswith("file://")
    loader = DataLoader(DecodedStream(source, tasks, job, preprocs), batch_size=None, collate_fn=_as_is,
                        num_workers=job.loader_workers,
                        # s3fs's event loop does not survive fork: give remote-reading workers a fresh process
                        multiprocessing_context="spawn" if remote and job.loader_workers else None)
    total = sum(len(t.items) for t in tasks) if source.kind != "webdataset" else None
    bar = tqdm(total=total, desc=f"part {part}", unit="img", position=part, dynamic_ncols=True, mininterval=1.0)
    pending: dict[int, dict] = defaultdict(lambda: {"images": [], "rejected": [], "emb": defaultdict(list)})
    for batch in loader:
        ok = [r for r in batch if "image" in r]
        embs = _embed(ok, encoders, preprocs, job.levels, job.flip, device) if ok else []
        emb_of = {id(r): e for r, e in zip(ok, embs)}
        for r in batch:
            buf = pending[r["task"]]
            if "rejected" in r:
                buf["rejected"].append({"key": r["key"], "source": r["source"], "reason": r["rejected"]})
                stats["rejected"] += 1
                bar.update(1)
            elif "image" in r:
                members = {job.image_format: r["image"], "json": r["json"]}
                if r["cls"] is not None:
                    members["cls"] = str(r["cls"]).encode()
                buf["images"].append((r["key"], members))
                for name, m in emb_of[id(r)].items():
                    buf["emb"][name].append((r["key"], m))
                stats["images"] += 1
                bar.update(1)
            else:  # done: the task's shard sets are complete in memory
                stats["bytes"] += _flush(fs, root, job, encoders, r["task"], pending.pop(r["task"]), needed[r["task"]])
                stats["shards"] += 1
    bar.close()
    return stats | {"seconds": time.perf_counter() - t0}


def _flush(fs, root: str, job: ShardJob, encoders: dict, index: int, buf: dict, sets: list[str]) -> int:
    """Write the encoder sets first and the images set last, each with its completion record."""
    written = 0
    for name in job.encoders:
        if name in sets:
            written += write_shard(fs, root, name, job.split, index, buf["emb"][name],
                                   extra={"encoder": encoders[name].describe()})
    if "images" in sets:
        written += write_shard(fs, root, "images", job.split, index, buf["images"],
                               extra={"rejected": buf["rejected"]})
    return written
