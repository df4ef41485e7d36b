"""The sharding stage's typed configuration: ``ShardJob`` is the schema of ``configs/shard.yaml`` and
what every part receives (picklable: it travels to local processes and SLURM array tasks alike)."""
from __future__ import annotations

from dataclasses import dataclass, field

from rcdm.config import ClusterConfig
from rcdm.storage import StorageOptions


@dataclass
class SyntheticInput:
    """``input=synthetic``: the demo's procedural images (rcdm.synthetic) of this split."""

    count: int = 2048
    seed: int = 0


@dataclass
class ShardJob:
    input: str = "synthetic"  # synthetic | an image folder | WebDataset tars (path, brace pattern, glob)
    output: str = "data/demo"  # any fsspec URL: a local path or s3://bucket/prefix
    split: str = "train"
    synthetic: SyntheticInput = field(default_factory=SyntheticInput)
    encoders: list[str] = field(default_factory=lambda: ["vicreg", "dino", "barlow", "simclr"])
    levels: list[str] = field(default_factory=lambda: ["backbone", "projector"])
    arch: str = "tiny"  # tiny (demo, CPU) | resnet50 (the released encoders)
    encoder_weights: str = "released"  # tiny: the SSL-trained encoders shipped in rcdm/encoders/tiny_weights
    image_size: int = 32  # the training image's side
    image_format: str = "png"  # png | jpg
    jpeg_quality: int = 95
    flip: bool = True  # also store the embeddings of the mirrored view
    shard_size: int = 512  # images per shard
    workers: int = 1  # disjoint parts: local processes, or SLURM array tasks with cluster=slurm
    loader_workers: int = 2  # decoding processes per part
    batch_size: int = 128
    max_pixels: int = 256_000_000  # larger images are rejected as decompression bombs (PIL's own limit follows it)
    max_member_bytes: int = 512 * 2 ** 20  # larger input files or tar members are rejected unread
    max_rejected_fraction: float = 0.05
    device: str = "auto"
    download: bool = True
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    storage: StorageOptions = field(default_factory=StorageOptions)

    def source(self):
        from sharding.sources import make_source

        return make_source(self.input, self.split, self.image_size, self.shard_size, self.storage, self.synthetic,
                           self.max_member_bytes)

    def shard_sets(self) -> list[str]:
        return ["images", *self.encoders]
