"""Precompute every encoder's embeddings next to the images, as WebDataset shards plus a manifest.

    python launch/shard.py                                  # the embedded demo dataset under ./data/demo
    python launch/shard.py input=/datasets/imagenet/train output=s3://bucket/imagenet128 arch=resnet50 \
        encoder_weights=released image_size=128 workers=64 cluster=slurm
"""
from pipeline.schemas import hydra_app
from sharding.orchestrate import shard


def show(s: dict, cfg) -> None:
    print(f"{s['samples']} samples in split {s['split']} ({s['rejected']} rejected), "
          f"{s['processed_now']} processed now at {s['images_per_s']:.1f} images/s, "
          f"{s['bytes_written'] / 1e6:.1f} MB written in {s['seconds']:.1f} s -> {s['output']}/manifest.json")


main = hydra_app("shard", shard, show)

if __name__ == "__main__":
    main()
