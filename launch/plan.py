"""What a sweep will cost, printed before anything is submitted: the same overrides as launch/sweep.py.

    python launch/plan.py experiment=imagenet128_resnet50 encoder=vicreg,dino,barlow,simclr level=backbone,projector \
        data.url=s3://bucket/imagenet128 storage=s3 cluster=slurm plan.device=H100
    python launch/plan.py encoder=vicreg,dino,barlow,simclr level=backbone,projector      # the demo

Per job: nodes, devices, steps, global batch, images seen, device-hours (measured step times of
benchmarks/gpu_step.py for plan.device where recorded, else the model's FLOPs at plan.utilisation of the
device's bf16 peak, marked as an estimate; plan.peak_tflops=<TFLOP/s> for a device rcdm has no data sheet
for), checkpoint size x kept; then totals and the dataset's size (or why it could not be read).
"""
import sys

from pipeline.stages import job_configs
from rcdm.errors import UserError, cli_errors
from rcdm.manifest import read_manifest
from rcdm.cost import dataset_bytes, format_plan, plan_job
from rcdm.redaction import scrub

PLAN_KEYS = {"plan.device": "", "plan.utilisation": "0.35", "plan.peak_tflops": ""}


def plan_options(args: list[str]) -> tuple[dict, list[str]]:
    """The ``plan.*`` keys (checked) and the sweep's own overrides."""
    opts, rest = dict(PLAN_KEYS), []
    for a in args:
        key = a.split("=", 1)[0]
        if not key.startswith("plan."):
            rest.append(a)
            continue
        if key not in PLAN_KEYS:
            raise UserError(f"unknown key {key!r}; the plan's own keys are {', '.join(PLAN_KEYS)}")
        if "=" not in a or not a.split("=", 1)[1].strip():
            raise UserError(f"{key} needs a value: {key}=<value> (for example plan.device=H100)")
        opts[key] = a.split("=", 1)[1].strip()
    util = parse_fraction(opts["plan.utilisation"], "plan.utilisation")
    peak = opts["plan.peak_tflops"]
    if peak:
        try:
            peak = float(peak)
        except ValueError:
            peak = -1.0
        if not 0 < peak < 1e6:
            raise UserError(f"plan.peak_tflops={opts['plan.peak_tflops']} must be the device's dense bf16 TFLOP/s, a "
                            f"positive number")
    return {"device": opts["plan.device"], "utilisation": util, "peak_tflops": peak or None}, rest


def parse_fraction(value: str, key: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not 0 < x <= 1:
        raise UserError(f"{key}={value} must be a fraction in (0, 1] (0.35: 35 % of the device's peak)")
    return x


def main(argv: list[str]) -> str:
    opts, args = plan_options(list(argv))
    jobs, data, unreadable = [], None, None
    for cfg in job_configs(args):
        embed_dim = 2048
        if not cfg.data.build_if_missing and unreadable is None:
            try:
                manifest = read_manifest(cfg.data.url, cfg.storage)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - no credentials, endpoint down, ...: the plan goes on without it
                manifest, unreadable = None, f"{type(e).__name__}: {scrub(str(e))[:200]}"
            enc = manifest.encoders.get(cfg.encoder.name) if manifest else None
            embed_dim = enc.levels.get(cfg.level.name, 2048) if enc else 2048
        jobs.append(plan_job(cfg, embed_dim, opts["device"], opts["utilisation"], opts["peak_tflops"]))
        data = data or cfg
    if not jobs:
        raise UserError("no job to plan: give the sweep's overrides")
    size = None if unreadable else dataset_bytes(data.data.url, data.storage)
    text = format_plan(jobs, data.data.url, size, unreadable)
    print(text)
    return text


if __name__ == "__main__":
    with cli_errors():
        main(sys.argv[1:])
