"""The training step and the sharding forward on the device at hand, the official way against rcdm's.

    python benchmarks/gpu_step.py [--presets tiny,adm64,adm128] [--steps 10] [--compile] [--out benchmarks/results/gpu_step.json]
    python benchmarks/gpu_step.py --reduced      # CPU smoke size: narrow UNets, batch 2 (what the test runs)
    PYTHONPATH=. python benchmarks/gpu_step.py   # from a checkout on a machine where rcdm is not installed

1. training step per UNet preset, on one synthetic batch resident on the device (the loader is
   benchmarks/training.py's business): ``fp32_eager`` is the official code's way (fp32, NCHW, AdamW
   unfused), ``rcdm`` is rcdm's training path (bf16 autocast, channels_last and fused AdamW on CUDA; on a CPU
   this benchmark keeps fp32, so the two match there; training's CPU bf16 (train.precision=auto) is measured by
   benchmarks/time_to_shape.py's bf16 arm), ``rcdm_compile`` adds torch.compile (--compile).
   Per path: median step seconds, images/s, peak device memory, and achieved TFLOP/s (three times the
   forward FLOPs counted by torch's FlopCounterMode, per image) against the device's dense bf16 peak.
2. the sharding forward: a ResNet-50 and a ViT-B/16 at 224 px, fp32 against bf16 autocast +
   channels_last, in images/s.
``launch/plan.py plan.device=<name>`` reads the ``rcdm`` step seconds of the device it is told about.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from rcdm.device import autocast, describe
from rcdm.diffusion.gaussian import create_diffusion
from rcdm.cost import peak_tflops, unet_cost
from rcdm.presets import PRESETS
from rcdm.provenance import machine
from rcdm.unet import RCDMUNet

BATCH = {"tiny": 32, "adm64": 64, "adm128": 32, "adm256": 8}  # per GPU; adm128: the official 256 over 8 GPUs


def device_peak(device: torch.device) -> float | None:
    return peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_path(cfg, path: str, device: torch.device, batch: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = RCDMUNet(cfg).to(device)
    fast = path != "fp32_eager" and device.type == "cuda"
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fast)
    net = torch.compile(model) if path == "rcdm_compile" else model
    diffusion = create_diffusion("cosine", prediction="epsilon", learn_sigma=cfg.out_channels == 6)
    s = cfg.image_size
    x = torch.rand(batch, 3, s, s, device=device) * 2 - 1
    if fast:
        x = x.contiguous(memory_format=torch.channels_last)
    h = torch.randn(batch, cfg.embed_dim, device=device)
    flops = unet_cost(cfg).forward_flops_per_image
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        t = torch.randint(0, 1000, (batch,), device=device)
        sync(device)
        t0 = time.perf_counter()
        with autocast(device) if path != "fp32_eager" else torch.autocast(device.type, enabled=False):
            loss = diffusion.training_losses(net, x, t, h)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    achieved = 3 * flops * batch / step_s / 1e12
    peak = device_peak(device)
    out = {"step_s": step_s, "step_s_all": times, "images_per_s": batch / step_s, "batch": batch,
           "forward_gflop_per_image": flops / 1e9, "achieved_tflops": achieved,
           "fraction_of_bf16_peak": achieved / peak if peak else None,
           "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
    del model, net, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def encoder_forward(name: str, device: torch.device, batch: int, steps: int) -> dict:
    from rcdm.encoders import build_encoder

    enc = build_encoder(name, "resnet50", "random", download=False, seed=0).to(device).eval()
    x = torch.randn(batch, 3, 224, 224, device=device)
    out = {}
    for path in ("fp32", "bf16_channels_last"):
        fast = path != "fp32" and device.type == "cuda"
        model = enc.to(memory_format=torch.channels_last) if fast else enc
        xi = x.contiguous(memory_format=torch.channels_last) if fast else x
        times = []
        with torch.no_grad():
            for i in range(steps + 1):
                sync(device)
                t0 = time.perf_counter()
                with autocast(device) if fast else torch.autocast(device.type, enabled=False):
                    model(xi)  # every level in one pass, as sharding runs it
                sync(device)
                if i:
                    times.append(time.perf_counter() - t0)
        out[path] = {"images_per_s": batch / statistics.median(times), "batch": batch}
    return out


def reduced_config(name: str):
    """The preset's structure (depths, attention, resolution halved) with 32 base channels: a CPU smoke size."""
    cfg = PRESETS[name]
    return replace(cfg, model_channels=32, num_heads=2, num_head_channels=-1, image_size=min(cfg.image_size, 32),
                   attention_ds=tuple(d for d in cfg.attention_ds if d <= min(cfg.image_size, 32) // 4) or (4,),
                   channel_mult=cfg.channel_mult[:3])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,adm64,adm128")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="per device; 0 = the preset's default")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--reduced", action="store_true", help="CPU smoke size (narrow UNets, batch 2, 2 steps)")
    ap.add_argument("--encoders", default="vicreg,dino_vitb16", help="sharding forward; '' = skip")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/gpu_step.json")
    a = ap.parse_args(argv)
    from rcdm.device import pick_device

    device = pick_device(a.device)
    if a.reduced:
        a.steps, a.warmup, a.batch = min(a.steps, 2), 1, a.batch or 2
        torch.set_num_threads(1)  # a smoke run beside other work: oversubscribed threads only add noise
    paths = ["fp32_eager", "rcdm"] + (["rcdm_compile"] if a.compile else [])
    result = {"device": describe(device), "machine": machine(device), "reduced": a.reduced,
              "peak_bf16_tflops": device_peak(device), "presets": {}, "encoders": {}}
    for name in [p for p in a.presets.split(",") if p]:
        cfg = reduced_config(name) if a.reduced else replace(PRESETS[name], embed_dim=2048)
        batch = a.batch or BATCH[name]
        result["presets"][name] = {"config": asdict(cfg), **{
            path: step_path(cfg, path, device, batch, a.steps, a.warmup) for path in paths}}
        r = result["presets"][name]
        print(f"{name}: " + ", ".join(f"{p} {r[p]['step_s']:.3f} s/step ({r[p]['images_per_s']:.1f} img/s)"
                                      for p in paths), flush=True)
    for name in [e for e in a.encoders.split(",") if e]:
        result["encoders"][name] = encoder_forward(name, device, a.batch or 64, a.steps)
        print(f"{name} forward: {result['encoders'][name]}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
