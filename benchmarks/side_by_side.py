"""Two demo jobs side by side with one torch thread each, against one job with every thread: which trains more
images per second on this machine.

    python benchmarks/side_by_side.py [--steps 120] [--out benchmarks/results/side_by_side.json]

Both settings run the real training loop (``rcdm.train.train``: loader, update, EMA, the run's own timing) of the
tiny UNet at the demo's batch (32) in the precision ``train.precision=auto`` picks, on the same synthetic shards:
- ``one_job``: one process, torch on all ``--threads`` cores;
- ``side_by_side``: ``--threads`` processes at once, one torch thread each.
Images/s is what the loop's own clock counts (``train_seconds``: data, update and EMA, no start-up or evaluation),
summed over the processes that ran at once. Run it with nothing else on the machine: torch on a few cores slows
sharply when anything else runs, and that is what this measures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rcdm.provenance import machine

BATCH = 32


def dataset(root: Path) -> Path:
    from sharding.config import ShardJob, SyntheticInput
    from sharding.orchestrate import shard

    ds = root / "ds"
    for split, n in (("train", 512), ("val", 8)):
        shard(ShardJob(input="synthetic", output=str(ds), split=split, synthetic=SyntheticInput(n), image_size=32,
                       shard_size=128, encoders=["vicreg"], loader_workers=0))
    return ds


def worker(ds: str, root: str, steps: int, threads: int) -> dict:
    """One job of ``steps`` steps on ``threads`` torch threads; what its loop's clock says."""
    import torch

    torch.set_num_threads(threads)
    from rcdm.config import (ConditioningDiagnosticConfig, DataConfig, FaithfulnessConfig, GridConfig,
                             InvarianceCheckConfig, LoopConfig, ModelConfig, Named, TrackingConfig, TrainConfig)
    from rcdm.storage import StorageOptions
    from rcdm.train import train

    cfg = TrainConfig(encoder=Named("vicreg"), level=Named("backbone"), model=ModelConfig("tiny"),
                      data=DataConfig(url=ds), storage=StorageOptions(run_root=root),
                      tracking=TrackingConfig(f"sqlite:///{root}/m.db", "side-by-side"), job_name="job",
                      faithfulness=FaithfulnessConfig(images=0), grid=GridConfig(images=0),
                      diagnostic=ConditioningDiagnosticConfig(images=0), invariance=InvarianceCheckConfig(images=0),
                      train=LoopConfig(steps=steps, batch_size=BATCH, log_every=steps, checkpoint_every=10 ** 9,
                                       sample_every=10 ** 9, loader_workers=0, progress=False, lease_s=0))
    m = train(cfg)
    return {"steps": steps, "threads": threads, "train_seconds": m["train_seconds"], "precision": m["precision"],
            "images_per_s": steps * BATCH / m["train_seconds"]}


def run(ds: Path, work: Path, steps: int, threads: int, processes: int) -> dict:
    """``processes`` jobs at once, ``threads`` torch threads each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(ds), str(work / f"p{threads}x{i}"),
                               str(steps), str(threads)], env=env, stdout=subprocess.PIPE, text=True)
             for i in range(processes)]
    outs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a side-by-side worker failed with exit code {p.returncode}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return {"processes": processes, "threads_each": threads, "jobs": outs, "wall_s": time.perf_counter() - t0,
            "images_per_s": sum(o["images_per_s"] for o in outs)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the cores to fill (default: all)")
    ap.add_argument("--out", default="benchmarks/results/side_by_side.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rcdm-sbs-") as tmp:
        work = Path(tmp)
        ds = dataset(work)
        one = run(ds, work, args.steps, args.threads, 1)
        many = run(ds, work, args.steps, 1, args.threads)
    result = {"machine": machine(), "steps": args.steps, "batch": BATCH, "one_job": one, "side_by_side": many,
              "side_by_side_over_one_job": many["images_per_s"] / one["images_per_s"],
              "precision": one["jobs"][0]["precision"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("precision", "side_by_side_over_one_job")}
                     | {"one_job_images_per_s": one["images_per_s"], "side_by_side_images_per_s": many["images_per_s"]},
                     indent=1))
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        ds_, root_, steps_, threads_ = sys.argv[2:6]
        print(json.dumps(worker(ds_, root_, int(steps_), int(threads_))))
    else:
        main()
