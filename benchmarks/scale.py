"""The scale test, everything on 127.0.0.1: a dataset of 10,000 shards (1.28 M samples) on an S3 server (moto) and
an MLflow server holding one sweep of 1,000 child runs.

    python benchmarks/scale.py [--shards 10000] [--per-shard 128] [--runs 1000] [--out benchmarks/results/scale.json]

Measured (goals in brackets):
1. opening the manifest and starting a rank: open_dataset, the rank's TrainStream and its first batch [< 5 s];
2. resuming a rank at a late step (290k of a 300k-step job): time to its first batch and the bytes it read first
   [< 5 s];
3. the shard assignment at 256 and 1,024 (rank, worker) streams: samples per stream per epoch, max over min
   [< 1 %], and how many shards the streams read per epoch against the shards there are;
4. the sweep report of 1,000 runs with the metrics and end-of-run files a real run logs: its time and peak
   memory [< 2 min], and the latency of the runs-table search (the parent's children, as the report and
   launch/status.py query them).

The shard bytes are one real shard (the sharding stage's output for ``--per-shard`` demo images) stored under every
name: each object on the server is real and is read and checked like any other; the manifest lists each with its
count and sha256.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import rcdm.data as data
from pipeline.local_servers import free_port, moto_s3, stop_group, wait_http  # on 127.0.0.1, always stopped
from rcdm.manifest import read_manifest, write_manifest
from rcdm.provenance import machine
from rcdm.storage import StorageOptions
from sharding.config import ShardJob, SyntheticInput
from sharding.orchestrate import shard

ROOT = Path(__file__).resolve().parents[1]


ENCODER, LEVEL = "dino", "backbone"


def _s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="scale", aws_secret_access_key="scale",
                        region_name="us-east-1")


def build_dataset(tmp: Path, endpoint: str, shards: int, per_shard: int) -> tuple[str, StorageOptions, int]:
    """``shards`` copies of one real shard of ``per_shard`` demo images on the S3 server, with their manifest.
    -> (url, storage, bytes per shard over both shard sets)."""
    local = tmp / "one"
    shard(ShardJob(input="synthetic", output=str(local), split="train", synthetic=SyntheticInput(per_shard),
                   shard_size=per_shard, encoders=[ENCODER], loader_workers=0))
    manifest = read_manifest(str(local))
    (entry,) = manifest.splits["train"].shards
    sets = {s: (local / s / entry["name"]).read_bytes() for s in ("images", ENCODER)}
    s3 = _s3(endpoint)
    s3.create_bucket(Bucket="scale")
    names = [f"train-{i:06d}.tar" for i in range(shards)]

    def put(name: str) -> None:
        for s, body in sets.items():
            s3.put_object(Bucket="scale", Key=f"data/{s}/{name}", Body=body)

    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, names))
    manifest.splits["train"].shards = [{**entry, "name": n} for n in names]
    manifest.splits["train"].count = per_shard * shards
    storage = StorageOptions(run_root="s3://scale/runs", endpoint_url=endpoint)
    write_manifest("s3://scale/data", manifest, storage)
    return "s3://scale/data", storage, sum(len(b) for b in sets.values())


@contextlib.contextmanager
def shards_read() -> list:
    """The shards rcdm.data reads while open (names), by wrapping its one reader of a training shard."""
    seen, original = [], data.paired_samples

    def counting(info, name, *args, **kwargs):
        seen.append(name)
        return original(info, name, *args, **kwargs)

    data.paired_samples = counting
    try:
        yield seen
    finally:
        data.paired_samples = original


def first_batch(url: str, storage: StorageOptions, rank: int, world: int, batch: int, start: int) -> dict:
    t0 = time.perf_counter()
    info = data.open_dataset(url, ENCODER, LEVEL, "train", storage)
    opened = time.perf_counter() - t0
    with shards_read() as seen:
        stream = data.TrainStream(info, batch, rank, world, seed=0, start=start, storage=storage)
        next(iter(stream))
    return {"open_s": round(opened, 3), "first_batch_s": round(time.perf_counter() - t0, 3), "shards_read": len(seen)}


def assignment(info, streams: int) -> dict:
    """Samples per stream in epoch 0 with streams = ranks (one worker each), and the shards they read."""
    stream = data.TrainStream(info, 1, 0, streams, seed=0)
    sizes, reads = [], 0
    for s in range(streams):
        pieces = stream.pieces(s, 0)
        sizes.append(sum(hi - lo for _, lo, hi in pieces))
        reads += len(pieces)
    n = len(stream.counts)
    whole = [len(range(s, n, streams)) * stream.counts[0] for s in range(streams)]  # whole shards, round robin
    return {"streams": streams, "samples_min": min(sizes), "samples_max": max(sizes),
            "imbalance": round(max(sizes) / min(sizes) - 1, 5), "shard_reads_per_epoch": reads, "shards": n,
            "extra_reads": round(reads / n - 1, 4),
            # None: with whole shards some streams would get none at all
            "whole_shards_round_robin_imbalance": round(max(whole) / min(whole) - 1, 5) if min(whole) else None}


# ---------------------------------------------------------------- MLflow: one sweep of many runs

@contextlib.contextmanager
def mlflow_server(tmp: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "4",
           "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts")]
    with open(tmp / "mlflow.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc, timeout=120)
        yield url
    finally:
        stop_group(proc)


def _end_files(rng: random.Random, images: int) -> dict[str, dict]:
    """End-of-run files with the keys and sizes a real run writes (512 held-out images, as imagenet experiments)."""
    def ci(p):
        return [max(0.0, p - 0.05), min(1.0, p + 0.05)]
    mrr = rng.random()
    factors = {k: {"samples": (p := rng.random()), "samples_ci95": ci(p), "originals": 0.98, "bound": 0.9,
                   "chance": 0.25, "n": images} for k in ("shape", "colour", "background", "scale", "x", "y", "grayscale")}
    return {"faithfulness": {"mrr": mrr, "mrr_ci95": ci(mrr), "top1": mrr / 2, "top1_ci95": ci(mrr / 2), "n": images,
                             "chance": {"mrr": 0.013, "top1": 1 / images}, "keys": [f"val_{i:08d}" for i in range(images)],
                             "ranks": [rng.randint(1, images) for _ in range(images)]},
            "factor_reads": {"factors": factors},
            "conditioning": {"final": {f"cond_gain_q{q}": rng.random() for q in range(4)},
                             "history": [{f"cond_gain_q{q}": rng.random() for q in range(4)} for _ in range(60)]}}


def populate(url: str, runs: int, loss_points: int, tmp: Path) -> float:
    """A sweep's parent run and ``runs`` finished children, each with ~150 params, its loss history, end metrics,
    end-of-run JSON files and a sample grid. -> seconds taken."""
    import numpy as np
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient(url)
    exp = client.create_experiment("scale")
    encoders = [f"enc{i:03d}" for i in range(runs // 2)]
    parent = client.create_run(exp, run_name="sweep scale", tags={"sweep_id": "scale", "kind": "sweep"}).info.run_id
    client.log_param(parent, "sweep.overrides", f"encoder={','.join(encoders)} level=backbone,projector")
    grid = tmp / "step-000300000.png"  # as a run names its grids
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (4 * 34, 8 * 34, 3), dtype=np.uint8)).save(grid)

    def child(i: int) -> None:
        rng = random.Random(i)
        enc, level = encoders[i // 2], ("backbone", "projector")[i % 2]
        run = client.create_run(exp, run_name=f"{enc}-{level}", tags={"mlflow.parentRunId": parent, "encoder": enc,
                                                                        "level": level, "slurm_job_id": f"{1000 + i}_0"})
        rid, now = run.info.run_id, int(time.time() * 1000)
        # a sweep's resolved configs agree but for what is swept and the run's own folder
        params = [Param(f"group{g}.key{k}", f"value{g}.{k}") for g in range(15) for k in range(10)]
        params += [Param("encoder.name", enc), Param("level.name", level), Param("run_dir", f"runs/scale/{enc}-{level}")]
        for j in range(0, len(params), 100):
            client.log_batch(rid, params=params[j:j + 100])
        metrics = [Metric("loss", rng.random(), now, 1000 * (k + 1)) for k in range(loss_points)]
        metrics += [Metric(f"end/{k}", rng.random(), now, 1000 * loss_points) for k in range(40)]
        for j in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[j:j + 1000])
        folder = tmp / "files" / rid
        folder.mkdir(parents=True)
        for name, body in _end_files(rng, 512).items():
            (folder / f"{name}.json").write_text(json.dumps(body))
            client.log_artifact(rid, str(folder / f"{name}.json"))
        client.log_artifact(rid, str(grid), "samples")
        client.set_terminated(rid, "FINISHED")

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(child, range(runs)))
    client.set_terminated(parent, "FINISHED")
    return time.perf_counter() - t0


def report_and_search(url: str, runs: int, tmp: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("scale").experiment_id
    parent = client.search_runs([exp], "tags.kind = 'sweep'")[0].info.run_id
    lat = []
    for _ in range(3):
        t0 = time.perf_counter()
        children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=runs + 10)
        lat.append(time.perf_counter() - t0)
    assert len(children) == runs, len(children)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "launch" / "report.py"), f"tracking.uri={url}",
                        "tracking.experiment=scale", "sweep_id=scale", f"output={tmp / 'report'}",
                        f"hydra.run.dir={tmp / 'hydra'}"], capture_output=True, text=True, cwd=tmp)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"the report failed:\n{p.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"search_children_s": round(min(lat), 3), "search_children_s_all": [round(x, 3) for x in lat],
            "report_s": round(took, 1), "report_peak_rss_mb": round(max(peak, before) / 1024, 1),
            "report_html_mb": round((tmp / "report" / "report.html").stat().st_size / 2**20, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=10000)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--streams", default="256,1024")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--loss-points", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    ap.add_argument("--parts", default="s3,mlflow", help="s3 (shards), mlflow (report); a part left out keeps its "
                    "figures from --out")
    a = ap.parse_args(argv)
    parts = set(a.parts.split(","))
    streams = [int(s) for s in a.streams.split(",")]
    old = json.loads(Path(a.out).read_text()) if Path(a.out).exists() and parts != {"s3", "mlflow"} else {}
    if "machine" in old:  # a file from before the parts were recorded apart: both ran on that machine
        machine_then = old.pop("machine")
        old.setdefault("measured", {"s3": machine_then, "mlflow": machine_then})
    out: dict = {**old, "shards": a.shards, "per_shard": a.per_shard, "runs": a.runs,
                 "goals": {"start_s": 5, "resume_s": 5, "imbalance": 0.01, "report_s": 120}}
    measured = {}

    def save() -> None:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2))
    with tempfile.TemporaryDirectory(prefix="rcdm-scale-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ.update(AWS_ACCESS_KEY_ID="scale", AWS_SECRET_ACCESS_KEY="scale")
        if "s3" in parts:
            with moto_s3(tmp / "moto.log") as endpoint:
                t0 = time.perf_counter()
                url, storage, shard_bytes = build_dataset(tmp, endpoint, a.shards, a.per_shard)
                out["upload_s"] = round(time.perf_counter() - t0, 1)
                out["shard_bytes"] = shard_bytes
                world = max(streams)  # a rank of the largest job: one stream per rank
                out["start"] = first_batch(url, storage, world - 1, world, 1, 0)
                out["resume"] = first_batch(url, storage, world - 1, world, 1, 290_000)
                out["resume"]["at_step"] = 290_000
                out["resume"]["bytes_read_first"] = out["resume"]["shards_read"] * shard_bytes
                info = data.open_dataset(url, ENCODER, LEVEL, "train", storage)
                out["assignment"] = [assignment(info, s) for s in streams]
            measured["s3"] = {**machine(), "date": time.strftime("%Y-%m-%d")}
            save()  # the S3 half, kept if the MLflow half fails
        if "mlflow" in parts:
            with mlflow_server(tmp) as mlflow_url:
                out["populate_s"] = round(populate(mlflow_url, a.runs, a.loss_points, tmp), 1)
                out["mlflow"] = report_and_search(mlflow_url, a.runs, tmp)
            measured["mlflow"] = {**machine(), "date": time.strftime("%Y-%m-%d")}
    out["measured"] = {**old.get("measured", {}), **measured}  # each part: the machine and day it ran on
    met = {}
    if "start" in out:
        met.update(start=out["start"]["first_batch_s"] < 5, resume=out["resume"]["first_batch_s"] < 5,
                   imbalance=all(x["imbalance"] < 0.01 for x in out["assignment"]))
    if "mlflow" in out:
        met["report"] = out["mlflow"]["report_s"] < 120
    out["met"] = met
    save()
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
