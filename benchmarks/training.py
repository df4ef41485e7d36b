"""Training overheads, measured side by side in one run.

    python benchmarks/training.py [--out benchmarks/results/training.json] [--presets tiny,adm128]

1. step overhead: the real training loop (``rcdm.train.train``: loader, EMA, logging to MLflow,
   images/s read from its own metric over the timed window) against the pure model update
   (forward, hybrid loss, backward, optimizer step) on one batch held on the device. Goal >= 0.90.
2. input pipeline: training samples per second per CPU core from the shards (read, decode the stored
   image and embedding, flip) against the official pipeline on the same source images (decode the
   full-size JPEG, two centre crops, a ResNet-50 forward per image). Goal >= 10x.
One thread for the pipeline comparison (per core); medians.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from rcdm.config import (ConditioningDiagnosticConfig, DataConfig, FaithfulnessConfig, GridConfig, InvarianceCheckConfig,
                         LoopConfig, ModelConfig, Named, TrackingConfig, TrainConfig)
from rcdm.data import TrainStream, open_dataset
from rcdm.device import training_precision
from rcdm.diffusion.gaussian import create_diffusion
from rcdm.encoders import build_encoder
from rcdm.preprocess import Preprocess, center_crop, load_rgb
from rcdm.presets import PRESETS, build_unet
from rcdm.storage import StorageOptions
from rcdm.train import apply_update, forward_losses, train
from sharding.config import ShardJob, SyntheticInput
from sharding.orchestrate import shard
from rcdm.provenance import machine


def make_jpegs(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (rng.random((375, 500, 3)) * 60 + np.linspace(0, 180, 500)[None, :, None]).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:05d}.jpg", quality=90)


def step_overhead(preset: str, work: Path, batch: int, steps: int) -> dict:
    size = PRESETS[preset].image_size
    ds = work / f"ds{size}"
    if not (ds / "manifest.json").exists():
        for split, n in (("train", 64), ("val", 4)):
            shard(ShardJob(input="synthetic", output=str(ds), split=split, synthetic=SyntheticInput(n), image_size=size,
                           shard_size=32, encoders=["dino"], loader_workers=0))
    cfg = TrainConfig(encoder=Named("dino"), level=Named("projector"), model=ModelConfig(preset),
                      data=DataConfig(url=str(ds)), storage=StorageOptions(run_root=str(work)),
                      tracking=TrackingConfig(f"sqlite:///{work / 'bench.db'}", f"bench-{preset}"),
                      job_name=preset, faithfulness=FaithfulnessConfig(images=0),  # no end-of-run evaluation to wait
                      grid=GridConfig(images=1, samples=1, steps="ddim2"),           # for: it is not timed
                      diagnostic=ConditioningDiagnosticConfig(images=0), invariance=InvarianceCheckConfig(images=0),
                      train=LoopConfig(steps=steps, batch_size=batch, log_every=steps - 2, checkpoint_every=10 ** 9,
                                       sample_every=10 ** 9, loader_workers=1, progress=False))
    train(cfg)  # the first log_every steps are warm-up; the last window is timed by the loop itself
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    loop_ips = sorted(client.get_metric_history(run.info.run_id, "images_per_s"), key=lambda m: m.step)[-1].value

    info = open_dataset(str(ds), "dino", "projector")
    torch.manual_seed(0)
    model = build_unet(preset, info.embed_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = create_diffusion()
    precision = training_precision(cfg.train.precision, torch.device("cpu"))  # the loop's (bf16 on native-bf16 CPUs)
    x, h = torch.rand(batch, 3, size, size) * 2 - 1, torch.randn(batch, info.embed_dim)
    times = []
    for i in range(3):
        t = torch.randint(0, 1000, (batch,))
        t0 = time.perf_counter()
        apply_update(model, opt, forward_losses(model, diffusion, x, h, t, precision=precision)["loss"].mean(), 1.0)
        if i:  # the first is warm-up
            times.append(time.perf_counter() - t0)
    pure_ips = batch / statistics.median(times)
    return {"preset": preset, "batch": batch, "precision": precision, "loop_images_per_s": loop_ips,
            "pure_update_images_per_s": pure_ips, "ratio": loop_ips / pure_ips}


def pipeline(work: Path, n: int, image_size: int) -> dict:
    torch.set_num_threads(1)
    jpegs = work / "jpegs"
    make_jpegs(jpegs, n)
    ds = work / f"pipe{image_size}"
    shard(ShardJob(input=str(jpegs), output=str(ds), image_size=image_size, image_format="jpg", shard_size=n,
                   encoders=["dino"], loader_workers=0))
    stream = TrainStream(open_dataset(str(ds), "dino", "projector"), batch_size=1, rank=0, world=1, seed=0, shuffle_buffer=1)
    it = iter(stream)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    ours = n / (time.perf_counter() - t0)

    encoder = build_encoder("dino", "resnet50", "random")
    pp = Preprocess()
    files = sorted(jpegs.iterdir())[: max(4, n // 8)]
    t0 = time.perf_counter()
    with torch.no_grad():
        for f in files:  # as the official training loop does for every image of every step
            img = load_rgb(f)
            center_crop(img, image_size)
            encoder(pp(img)[None])
    official = len(files) / (time.perf_counter() - t0)
    return {"image_size": image_size, "ours_samples_per_s_per_core": ours,
            "official_samples_per_s_per_core": official, "ratio": ours / official}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/training.json")
    ap.add_argument("--presets", default="tiny,adm128")
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args(argv)
    settings = {"tiny": (16, 40), "adm128": (2, 6)}  # (batch, steps) that fit a CPU in minutes
    with tempfile.TemporaryDirectory(prefix="rcdm-bench-train-") as d:  # runs and images, removed at the end
        work = Path(d)
        steps = [step_overhead(p, work, *settings.get(p, (2, 6))) for p in args.presets.split(",")]
        inputs = [pipeline(work, args.images, 128)]
    result = {"step_overhead": steps, "input_pipeline": inputs, "machine": machine(),
              "note": "loop = rcdm.train.train's own images_per_s over its last logging window (loader, EMA, "
                      "MLflow logging included); pure = forward + loss + backward + AdamW step on a resident batch"}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
