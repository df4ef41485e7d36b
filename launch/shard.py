"""Precompute every encoder's embeddings next to the images, as WebDataset shards plus a manifest.

    python launch/shard.py                                  # the embedded demo dataset under ./data/demo
    python launch/shard.py input=/datasets/imagenet/train output=s3://bucket/imagenet128 arch=resnet50 \
        encoder_weights=released image_size=128 workers=64 cluster=slurm
"""
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import schemas
from rcdm.errors import cli_errors
from sharding.orchestrate import shard

log = logging.getLogger("rcdm.shard")
schemas.register("shard_schema")


@hydra.main(version_base="1.3", config_path="../configs", config_name="shard")
def main(cfg: DictConfig) -> None:
    with cli_errors():
        s = shard(OmegaConf.to_object(cfg))
    print(f"{s['samples']} samples in split {s['split']} ({s['rejected']} rejected), "
          f"{s['processed_now']} processed now at {s['images_per_s']:.1f} images/s, "
          f"{s['bytes_written'] / 1e6:.1f} MB written in {s['seconds']:.1f} s -> {s['output']}/manifest.json")


if __name__ == "__main__":
    main()
