"""Precompute every encoder's embeddings next to the images, as WebDataset shards plus a manifest.

    python launch/shard.py                                  # the embedded demo dataset under ./data/demo
    python launch/shard.py input=/datasets/imagenet/train output=s3://bucket/imagenet128 arch=resnet50 \
        encoder_weights=released image_size=128 workers=64 cluster=slurm
"""
import logging
import sys

import hydra
from omegaconf import DictConfig

from rcdm.errors import UserError
from sharding.config import job_from_cfg, slurm_from_cfg
from sharding.run import shard

log = logging.getLogger("rcdm.shard")


@hydra.main(version_base="1.3", config_path="../configs", config_name="shard")
def main(cfg: DictConfig) -> None:
    try:
        s = shard(job_from_cfg(cfg), workers=cfg.workers, cluster=cfg.cluster.name, slurm=slurm_from_cfg(cfg),
                  max_rejected_fraction=cfg.max_rejected_fraction)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{s['samples']} samples in split {s['split']} ({s['rejected']} rejected), "
          f"{s['processed_now']} processed now at {s['images_per_s']:.1f} images/s, "
          f"{s['bytes_written'] / 1e6:.1f} MB written in {s['seconds']:.1f} s -> {s['output']}/manifest.json")


if __name__ == "__main__":
    main()
