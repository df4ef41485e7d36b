"""What a sweep will cost, printed before anything is submitted: the same overrides as launch/sweep.py.

    python launch/plan.py experiment=imagenet128_resnet50 encoder=vicreg,dino,barlow,simclr level=backbone,projector \
        data.url=s3://bucket/imagenet128 storage=s3 cluster=slurm plan.device=H100
    python launch/plan.py encoder=vicreg,dino,barlow,simclr level=backbone,projector      # the demo

Per job: nodes, devices, steps, global batch, images seen, device-hours (measured step times of
benchmarks/gpu_step.py for plan.device where recorded, else the model's FLOPs at plan.utilisation of the
device's bf16 peak, marked as an estimate), checkpoint size x kept; then totals and the dataset's size.
"""
import sys

from pipeline.sweep import job_configs
from rcdm.errors import UserError, cli_errors
from rcdm.manifest import read_manifest
from rcdm.plan import dataset_bytes, format_plan, plan_job

PLAN_KEYS = {"plan.device": "", "plan.utilisation": "0.35"}


def main(argv: list[str]) -> str:
    args = list(argv)
    opts = dict(PLAN_KEYS)
    for a in [a for a in args if a.split("=", 1)[0] in PLAN_KEYS]:
        key, value = a.split("=", 1)
        opts[key] = value
        args.remove(a)
    jobs, data = [], None
    for cfg in job_configs(args):
        manifest = read_manifest(cfg.data.url, cfg.storage) if not cfg.data.build_if_missing else None
        enc = manifest.encoders.get(cfg.encoder.name) if manifest else None
        embed_dim = enc.levels.get(cfg.level.name, 2048) if enc else 2048
        jobs.append(plan_job(cfg, embed_dim, opts["plan.device"], float(opts["plan.utilisation"])))
        data = data or cfg
    if not jobs:
        raise UserError("no job to plan: give the sweep's overrides")
    text = format_plan(jobs, data.data.url, dataset_bytes(data.data.url, data.storage))
    print(text)
    return text


if __name__ == "__main__":
    with cli_errors():
        main(sys.argv[1:])
