"""Where a sweep submitted with cluster.wait=false stands; ends it (parent MLflow run and report) once every
job has ended. The same overrides as the launch/sweep.py command that submitted it (sweep values are fine):

    python launch/sweep.py -m encoder=vicreg,dino level=backbone,projector cluster=slurm cluster.wait=false \
        storage=s3 storage.run_root=s3://bucket/runs tracking=server        # returns once submitted
    python launch/status.py -m encoder=vicreg,dino level=backbone,projector cluster=slurm cluster.wait=false \
        storage=s3 storage.run_root=s3://bucket/runs tracking=server        # any time later, from any shell
"""
import sys

from pipeline.reconcile import format_status, reconcile
from pipeline.command_line import job_configs
from rcdm.errors import cli_errors


def main(argv: list[str]) -> dict:
    record = reconcile(job_configs(argv)[0])
    print(format_status(record), flush=True)
    return record


if __name__ == "__main__":
    with cli_errors():
        main(sys.argv[1:])
