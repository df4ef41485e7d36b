"""Sharding overheads, measured side by side in one run on the same images.

    python benchmarks/shard_throughput.py [--out benchmarks/results/sharding.json] [--images 48] [--arch resnet50]

1. throughput: the full sharding run (read JPEGs, decode, crop, every encoder x level and the mirrored
   view, tar writing) against the bare batched forward of the same encoders on the same images held
   in memory as tensors. Goal: ratio >= 0.90.
2. one pass: the 4 encoders at both levels against the sum of the 4 backbone forwards. Goal <= 1.10.
3. peak RSS of a sharding process at two dataset sizes 10x apart (synthetic, tiny arch). Goal <= 1.2x.
Medians of --repeats runs; random weights (the cost does not depend on the values).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rcdm.encoders import build_encoder
from rcdm.preprocess import load_rgb
from sharding.config import ShardJob
from sharding.orchestrate import shard
from rcdm.provenance import machine

ENCODERS = ["vicreg", "dino", "barlow", "simclr"]


def make_jpegs(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        arr = (rng.random((375, 500, 3)) * 40 + np.linspace(0, 200, 500)[None, :, None]).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:05d}.jpg", quality=90)


def bare_forward(encoders, x: torch.Tensor, batch: int, trunk_only: bool) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for chunk in x.split(batch):
            chunk = torch.cat([chunk, chunk.flip(3)])
            for enc in encoders:
                enc.backbone(chunk) if trunk_only else enc(chunk)
    return time.perf_counter() - t0


def peak_rss_mb(count: int, workdir: Path) -> float:
    code = (f"import resource; from sharding.config import ShardJob, SyntheticInput; "
            f"from sharding.orchestrate import shard; shard(ShardJob(input='synthetic', output='{workdir}/rss{count}', synthetic=SyntheticInput({count}), "
            f"shard_size=256, loader_workers=0)); "
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def measure(args, work: Path) -> dict:
    """The figures of the JSON, from images and shards written under ``work``."""
    make_jpegs(work / "jpegs", args.images)
    encoders = [build_encoder(n, args.arch, "random") for n in ENCODERS]
    pp = encoders[0].preprocess
    x = torch.stack([pp(load_rgb(p)) for p in sorted((work / "jpegs").iterdir())])  # the same images, in memory

    def shard_seconds(folder: Path, out: str) -> float:
        job = ShardJob(input=str(folder), output=str(work / out), encoders=ENCODERS, arch=args.arch,
                       encoder_weights="random", image_size=128, image_format="jpg", shard_size=args.batch * 2,
                       batch_size=args.batch, loader_workers=1)
        t0 = time.perf_counter()
        shard(job)
        return time.perf_counter() - t0

    # Steady state: the run over 3N images minus the run over N images (same start-up: loading the
    # encoders, listing, the manifest) is the cost of 2N images in the stream.
    make_jpegs(work / "jpegs3", 3 * args.images)
    shard_s, bare_s, trunk_s = [], [], []
    for r in range(args.repeats):
        shard_s.append(shard_seconds(work / "jpegs3", f"big{r}") - shard_seconds(work / "jpegs", f"small{r}"))
        bare_s.append(2 * bare_forward(encoders, x, args.batch, trunk_only=False))
        trunk_s.append(2 * bare_forward(encoders, x, args.batch, trunk_only=True))
    sizes = [int(s) for s in args.rss_sizes.split(",")]
    rss = {n: peak_rss_mb(n, work) for n in sizes}
    med = statistics.median
    return {
        "images": args.images, "arch": args.arch, "batch": args.batch, "encoders": ENCODERS, "flip": True,
        "sharding_images_per_s": 2 * args.images / med(shard_s),
        "bare_forward_images_per_s": 2 * args.images / med(bare_s),
        "throughput_ratio": med(bare_s) / med(shard_s),
        "one_pass_all_levels_s": med(bare_s), "sum_of_backbone_forwards_s": med(trunk_s),
        "one_pass_cost_ratio": med(bare_s) / med(trunk_s),
        "peak_rss_mb": rss, "peak_rss_ratio": rss[sizes[-1]] / rss[sizes[0]],
        "raw_seconds": {"sharding": shard_s, "bare": bare_s, "trunk": trunk_s},
        "machine": machine(),
        "note": "seconds are for 2N images: sharding as run(3N) - run(N), so start-up cancels out; bare forward "
                "as twice the time of N in-memory images; peak RSS in MB (ru_maxrss) of a synthetic tiny-arch run",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/sharding.json")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-sizes", default="400,4000")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rcdm-bench-") as d:  # images and shards, removed at the end
        result = measure(args, Path(d))
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
