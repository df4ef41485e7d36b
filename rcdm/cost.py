"""What a sweep will cost, before anything is submitted: per job the devices, steps, images seen, device-hours,
and the storage its dataset and checkpoints take (``launch/plan.py``, the same overrides as ``launch/sweep.py``).

Device-hours come from a measured step time where ``benchmarks/results/gpu_step.json`` holds one for the device
named (``--device``, matched on the name the benchmark recorded), scaled linearly in the per-device batch; else
from the model's FLOPs (counted by torch on a meta-device model, three times the forward per image) at a stated
utilisation of the device's dense bf16 peak, and marked as an estimate. For the demo's tiny preset on a CPU, three
training steps on random tensors time this machine (at most 2048-d conditioning); nothing here reads the data.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rcdm.config import TrainConfig
from rcdm.errors import UserError

# Dense bf16 peaks from the vendors' data sheets (TFLOP/s, no sparsity), matched on the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0, "V100": 125.0}
CHECKPOINT_BYTES_PER_PARAM = 16  # fp32 model, EMA and AdamW's two moments
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gpu_step.json"


@dataclass
class PlanOptions:
    """``launch/plan.py``'s own keys (``plan.<key>=value``), beside the sweep's overrides."""
    device: str = ""  # the device to cost on (H100, "NVIDIA H200", L40S): measured step times or its data sheet
    utilisation: float = 0.35  # the share of the device's bf16 peak the FLOP estimate assumes, in (0, 1]
    peak_tflops: float | None = None  # the device's dense bf16 TFLOP/s, for a device rcdm has no data sheet for

    def check(self) -> "PlanOptions":
        u = self.utilisation
        if not 0 < u <= 1:  # NaN fails too
            raise UserError(f"plan.utilisation={u} must be a fraction in (0, 1] (0.35: 35 % of the device's peak)")
        if self.peak_tflops is not None and not 0 < self.peak_tflops < 1e6:
            raise UserError(f"plan.peak_tflops={self.peak_tflops} must be the device's dense bf16 TFLOP/s, a "
                            f"positive number")
        return self


def _tokens(name: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", name.lower())


def peak_tflops(device_name: str) -> float | None:
    """The data-sheet peak of the device ``device_name`` names: the longest known name whose words all appear, whole,
    in it (``NVIDIA H100 80GB HBM3`` is an H100 SXM; ``L40`` is not an ``L4``); None for a device not listed."""
    words = _tokens(device_name)
    hits = [k for k in PEAK_BF16_TFLOPS if all(w in words for w in _tokens(k))]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


@dataclass
class Model:
    parameters: int
    forward_flops_per_image: float


def unet_cost(ucfg) -> Model:
    """Parameters and forward FLOPs per image of the UNet ``ucfg`` (a UNetConfig), counted by torch on the meta
    device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rcdm.unet import RCDMUNet

    with torch.device("meta"):
        net = RCDMUNet(ucfg)
        x = torch.zeros(1, 3, ucfg.image_size, ucfg.image_size)
        t, h = torch.zeros(1, dtype=torch.long), torch.zeros(1, ucfg.embed_dim)
        with FlopCounterMode(display=False) as counter:
            net(x, t, h)
    return Model(sum(p.numel() for p in net.parameters()), float(counter.get_total_flops()))


def measured_step(device: str, preset: str, results: Path | None = None) -> dict | None:
    """The ``rcdm`` path's measured step of ``preset`` on ``device`` (a substring of the recorded name)."""
    results = results or RESULTS
    if not device or not results.exists():
        return None
    r = json.loads(results.read_text())
    name = (r.get("machine") or {}).get("gpu") or r.get("device", "")
    if r.get("reduced") or not all(w in _tokens(name) for w in _tokens(device)):
        return None
    row = (r.get("presets") or {}).get(preset, {}).get("rcdm")
    return row and {**row, "device": name}


@dataclass
class JobPlan:
    job: str
    nodes: int
    devices: int
    steps: int
    batch: int
    images_seen: int
    device_hours: float
    hours_source: str
    checkpoint_gb: float
    checkpoints_kept: int
    parameters: int
    extras: dict = field(default_factory=dict)


_CPU_RATE: dict = {}


def cpu_images_per_s(cfg: TrainConfig, embed_dim: int, steps: int = 3) -> float:
    """Training images/s of the job's preset on this machine's CPU, timed over a few steps on random data (once
    per preset and batch): the demo's cost is a CPU cost."""
    import time

    from rcdm.diffusion.gaussian import create_diffusion
    from rcdm.presets import build_unet
    from rcdm.train import apply_update, forward_losses

    embed_dim = min(embed_dim, 2048)  # the conditioning layer is a sliver of the step: time a bounded one
    key = (cfg.model.name, cfg.train.batch_size, embed_dim)
    if key not in _CPU_RATE:
        torch.manual_seed(0)
        net = build_unet(cfg.model.name, embed_dim)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        diffusion = create_diffusion()
        s, b = net.cfg.image_size, cfg.train.batch_size
        x, h = torch.rand(b, 3, s, s) * 2 - 1, torch.randn(b, embed_dim)
        times = []
        for i in range(steps + 1):  # the first is warm-up
            t0 = time.perf_counter()
            loss = forward_losses(net, diffusion, x, h, torch.randint(0, 1000, (b,)))["loss"].mean()
            apply_update(net, opt, loss, 1.0)
            times.append(time.perf_counter() - t0)
        _CPU_RATE[key] = b / sorted(times[1:])[len(times[1:]) // 2]
    return _CPU_RATE[key]


def runs_on_cpu(cfg: TrainConfig) -> bool:
    return cfg.device == "cpu" or (cfg.device == "auto" and cfg.cluster.name != "slurm" and not torch.cuda.is_available())


def plan_job(cfg: TrainConfig, embed_dim: int, device: str, utilisation: float,
             peak: float | None = None) -> JobPlan:
    """``peak``: the device's dense bf16 TFLOP/s where rcdm has no data sheet for it (``plan.peak_tflops``)."""
    c = cfg.cluster
    nodes = c.nodes if c.name == "slurm" else 1
    per_node = c.gpus_per_node or c.tasks_per_node if c.name == "slurm" else 1
    devices = max(1, nodes * per_node)
    steps, batch = cfg.train.steps, cfg.train.batch_size
    from rcdm.presets import preset_config

    model = unet_cost(preset_config(cfg.model.name, embed_dim))
    step = measured_step(device, cfg.model.name)
    if runs_on_cpu(cfg) and cfg.model.name == "tiny":
        from rcdm.provenance import cpu_model

        rate = cpu_images_per_s(cfg, embed_dim)
        hours, source = steps * batch / rate / 3600, (
            f"CPU hours, measured here: {rate:.0f} images/s over 3 training steps on {cpu_model()} with "
            f"{torch.get_num_threads()} threads (the end-of-run evaluation and data loading come on top)")
    elif step:
        per_device = batch / devices
        step_s = step["step_s"] * per_device / step["batch"]
        hours, source = steps * step_s * devices / 3600, (
            f"measured: {step['step_s']:.3f} s/step at batch {step['batch']} on {step['device']} "
            f"(benchmarks/gpu_step.py), scaled to batch {per_device:g} per device")
    else:
        named = peak is not None
        peak = peak or (peak_tflops(device) if device else 989.0)
        if peak is None:
            raise UserError(f"plan.device={device} is not a device rcdm knows the peak of "
                            f"({', '.join(PEAK_BF16_TFLOPS)}): add plan.peak_tflops=<its dense bf16 TFLOP/s from the "
                            f"data sheet>")
        flops = 3 * model.forward_flops_per_image * batch * steps
        hours = flops / (peak * 1e12 * utilisation) / 3600
        whose = "plan.peak_tflops" if named else f"bf16 peak of {device or 'an H100 SXM / H200 (no plan.device)'}"
        source = (f"estimate: {3 * model.forward_flops_per_image / 1e9:,.1f} GFLOP per image per step at "
                  f"{utilisation:.0%} of {peak:g} TFLOP/s ({whose}); no measured step for it in {RESULTS.name}")
    ckpt = model.parameters * CHECKPOINT_BYTES_PER_PARAM / 1e9
    return JobPlan(cfg.job_name, nodes, devices, steps, batch, steps * batch, hours, source, ckpt,
                   cfg.train.keep_checkpoints, model.parameters)


def dataset_bytes(url: str, storage) -> int | None:
    """Bytes under the dataset's URL (shards of every encoder, manifest), or None where it cannot be listed."""
    from rcdm.storage import open_fs

    try:
        fs, root = open_fs(url, storage)
        return int(fs.du(root, total=True)) if fs.exists(root) else None
    except Exception:  # a plan never fails on storage it cannot read: it says so
        return None


def format_plan(jobs: list[JobPlan], data_url: str, data_bytes: int | None, unreadable: str | None = None) -> str:
    head = ("job", "nodes", "devices", "steps", "global batch", "images seen", "device-hours", "checkpoints")
    rows = [(j.job, str(j.nodes), str(j.devices), f"{j.steps:,}", str(j.batch), f"{j.images_seen:,}",
             f"{j.device_hours:,.1f}", f"{j.checkpoint_gb:.2f} GB x {j.checkpoints_kept}") for j in jobs]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths))  # noqa: E731
    out = [line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]
    total_h = sum(j.device_hours for j in jobs)
    total_ckpt = sum(j.checkpoint_gb * j.checkpoints_kept for j in jobs)
    size = f"{data_bytes / 1e9:,.2f} GB" if data_bytes is not None else "unknown (nothing listed there yet)"
    if unreadable:
        size = (f"UNREADABLE ({unreadable}); its manifest could not be read, so every job is planned with 2048-d "
                f"conditioning: fix the storage settings or credentials and plan again")
    out += ["", f"total: {len(jobs)} jobs, {total_h:,.1f} device-hours, checkpoints {total_ckpt:,.1f} GB, "
                f"dataset {data_url}: {size}"]
    sources = sorted({j.hours_source for j in jobs})
    out += [f"device-hours: {s}" for s in sources]
    out += ["nothing was submitted: run launch/sweep.py with the same overrides (and -m) to start it"]
    return "\n".join(out)
