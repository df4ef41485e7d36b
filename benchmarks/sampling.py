"""Sampling speed against faithfulness, measured side by side in one run.

    python benchmarks/sampling.py [--checkpoint demo:vicreg-backbone] [--images 64]

For 1000, 250, 100, 50 and 25 respaced DDPM steps and DDIM 50 and 25: seconds per sample (one batch of
all images, the same conditioning embeddings and seed for every setting) and the RCDM faithfulness
protocol (MRR with its bootstrap interval, top-1, mean rank). Goal: at 50 steps at least 15x faster
than at 1000, with MRR within 5 % of the 1000-step figure. Writes benchmarks/results/sampling.json.
The conditioning images are synthetic ones no model trained on (images=synthetic:N of the analyses).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rcdm.analysis.images import load_inputs
from rcdm.analysis.faithfulness import faithfulness
from rcdm.device import pick_device
from rcdm.sampling import Sampling, draw, encode_pil, load_with_encoder
from rcdm.provenance import machine

SETTINGS = ("1000", "250", "100", "50", "25", "ddim50", "ddim25")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="demo:vicreg-backbone",
                    help="a demo model (demo:<encoder>-<level>, shipped), an rcdm run root or checkpoint")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", default="benchmarks/results/sampling.json")
    args = ap.parse_args(argv)
    device = pick_device("auto")
    if not Path(args.checkpoint).exists() and "://" not in args.checkpoint and not args.checkpoint.startswith("demo:"):
        sys.exit(f"no checkpoint at {args.checkpoint}: run the README's first line (the demo sweep) or pass "
                 f"--checkpoint <run root>")
    loaded, encoder = load_with_encoder(args.checkpoint, device)
    inputs = load_inputs(f"synthetic:{args.images}", loaded.model.cfg.image_size)
    h, _ = encode_pil(inputs.pils, encoder, encoder.preprocess, loaded.level, loaded.model.cfg.image_size, device)
    rows = []
    for steps in args.settings.split(","):
        how = Sampling(steps, None, 1.0, 0, len(h))
        sampler = how.kind
        t0 = time.perf_counter()
        samples = draw(loaded.model, loaded.process, h, how)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        f = faithfulness(h.cpu(), samples.cpu(), encoder, loaded.level, boot=1000, seed=0)
        rows.append({"steps": steps, "sampler": sampler, "seconds_per_sample": seconds / len(h), "mrr": f["mrr"],
                     "mrr_ci95": f["mrr_ci95"], "top1": f["top1"], "mean_rank": f["mean_rank"]})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["steps"] == "1000"), None)
    if base:
        for r in rows:
            r["speedup_vs_1000"] = base["seconds_per_sample"] / r["seconds_per_sample"]
            r["mrr_relative_to_1000"] = r["mrr"] / base["mrr"] if base["mrr"] else None
    result = {"checkpoint": args.checkpoint, "encoder": loaded.card.encoder.name, "level": loaded.level,
              "images": len(h), "chance_mrr": f["chance"]["mrr"], "rows": rows,
              "goal": "50 steps: speedup_vs_1000 >= 15 and mrr_relative_to_1000 >= 0.95",
              "machine": machine(device)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
