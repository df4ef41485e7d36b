"""Hydra config -> the typed arguments of the sharding stage (the library never sees a DictConfig)."""
from __future__ import annotations

from omegaconf import DictConfig

from rcdm.storage import StorageOptions
from sharding.encode import ShardJob
from sharding.run import SlurmOptions


def storage_from_cfg(cfg: DictConfig) -> StorageOptions:
    s = cfg.storage  # the group also holds the training run root, which sharding does not use
    return StorageOptions(endpoint_url=s.get("endpoint_url"), region=s.get("region"), anon=bool(s.get("anon", False)))


def job_from_cfg(cfg: DictConfig) -> ShardJob:
    return ShardJob(
        input=str(cfg.input), output=str(cfg.output), split=cfg.split, image_size=cfg.image_size,
        image_format=cfg.image_format, jpeg_quality=cfg.jpeg_quality, encoders=list(cfg.encoders),
        levels=list(cfg.levels), arch=cfg.arch, encoder_weights=str(cfg.encoder_weights), flip=cfg.flip,
        shard_size=cfg.shard_size, loader_workers=cfg.loader_workers, batch_size=cfg.batch_size,
        max_pixels=cfg.max_pixels, device=cfg.device, download=cfg.download, storage=storage_from_cfg(cfg),
        synthetic_count=cfg.synthetic.count, synthetic_seed=cfg.synthetic.seed)


def slurm_from_cfg(cfg: DictConfig) -> SlurmOptions | None:
    c = cfg.cluster
    if c.name != "slurm":
        return None
    return SlurmOptions(folder=c.folder, partition=c.partition, account=c.account, qos=c.qos,
                        constraint=c.constraint, time_min=c.time_min, cpus_per_task=c.cpus_per_task,
                        gpus_per_task=c.gpus_per_node, mem_gb=c.mem_gb, array_parallelism=c.array_parallelism)
