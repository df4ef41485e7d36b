"""What a sweep will cost, printed before anything is submitted: the same overrides as launch/sweep.py.

    python launch/plan.py experiment=imagenet128_resnet50 encoder=vicreg,dino,barlow,simclr level=backbone,projector \
        data.url=s3://bucket/imagenet128 storage=s3 storage.run_root=s3://bucket/runs cluster=slurm plan.device=H100
    python launch/plan.py encoder=vicreg,dino,barlow,simclr level=backbone,projector      # the demo

Per job: nodes, devices, steps, global batch, images seen, device-hours (measured step times of
benchmarks/gpu_step.py for plan.device where recorded, else the model's FLOPs at plan.utilisation of the
device's bf16 peak, marked as an estimate; plan.peak_tflops=<TFLOP/s> for a device rcdm has no data sheet
for), checkpoint size x kept; then totals and the dataset's size (or why it could not be read).
"""
import sys

from pipeline.command_line import sweep_command
from rcdm.cost import dataset_bytes, format_plan, plan_job
from rcdm.errors import UserError, cli_errors
from rcdm.manifest import read_manifest
from rcdm.redaction import scrub


def main(argv: list[str]) -> str:
    configs, opts = sweep_command("plan", list(argv))
    opts = opts.check()
    jobs, data, unreadable = [], None, None
    for cfg in configs:
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
        jobs.append(plan_job(cfg, embed_dim, opts.device, opts.utilisation, opts.peak_tflops))
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
