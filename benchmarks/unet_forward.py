"""Parameter count of every UNet preset and the wall time of one forward pass at batch 1.

    python benchmarks/unet_forward.py [--out benchmarks/results/unet_forward.json] [--repeats 3]

Writes JSON: {preset: {params, image_size, forward_s_median, forward_s_all, device, threads}}.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rcdm.device import autocast, pick_device
from rcdm.presets import PRESETS, build_unet
from rcdm.provenance import machine


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/unet_forward.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args(argv)
    device = pick_device("auto")
    results = {}
    for name in args.presets.split(","):
        model = build_unet(name, 2048).to(device).eval()
        size = model.cfg.image_size
        x, t, h = torch.randn(1, 3, size, size, device=device), torch.tensor([500], device=device), torch.randn(1, 2048, device=device)
        times = []
        with torch.no_grad(), autocast(device):
            model(x, t, h)  # warm-up
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(x, t, h)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        results[name] = {"params": sum(p.numel() for p in model.parameters()), "image_size": size,
                         "forward_s_median": statistics.median(times), "forward_s_all": times,
                         "device": str(device), "threads": torch.get_num_threads()}
        print(name, results[name])
        del model
    results["_machine"] = machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
