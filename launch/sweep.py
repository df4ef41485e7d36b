"""Train one RCDM per override combination; the product's main command.

    python launch/sweep.py -m encoder=vicreg,dino,barlow,simclr level=backbone,projector
    python launch/sweep.py -m encoder=vicreg,dino level=backbone,projector cluster=slurm cluster.partition=gpu \
        cluster.nodes=2 cluster.tasks_per_node=8 cluster.gpus_per_node=8 model=adm128 data=shards \
        data.url=s3://bucket/imagenet128 storage=s3 storage.run_root=s3://bucket/runs tracking=server
"""
import logging
import sys

import hydra
from omegaconf import DictConfig

from pipeline import schemas
from pipeline.stages import train_config
from rcdm.errors import cli_errors
from rcdm.train import Preempted, train

log = logging.getLogger("rcdm.sweep")
schemas.register("sweep_schema")


@hydra.main(version_base="1.3", config_path="../configs", config_name="sweep")
def main(cfg: DictConfig) -> dict:
    with cli_errors(catch_all=False):
        try:
            metrics = train(train_config(cfg))
        except Preempted as e:
            print(f"preempted: {e}; start the same command again to resume", file=sys.stderr)
            sys.exit(3)
    if "loss" in metrics:  # rank 0 holds the metrics; other ranks return the step alone
        log.info("%s finished at step %d, loss %.4f", cfg.job_name, metrics["step"], metrics["loss"])
    return metrics


if __name__ == "__main__":
    main()
