"""Train a tiny encoder with its own SSL objective on the synthetic images.

    python launch/pretrain_encoder.py method=simclr
"""
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from rcdm.errors import cli_errors
from rcdm.ssl.augment import AugmentConfig
from rcdm.ssl.pretrain import PretrainConfig, pretrain

log = logging.getLogger("rcdm.pretrain")


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain_encoder")
def main(cfg: DictConfig) -> None:
    m = cfg.method
    augment = {k: tuple(v) if OmegaConf.is_list(v) else v for k, v in OmegaConf.to_container(m.augment).items()}
    pc = PretrainConfig(method=m.name, output=str(cfg.output), steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, images=cfg.images,
                        image_size=cfg.image_size, data_seed=cfg.data_seed, seed=cfg.seed,
                        device=cfg.device,
                        augment=AugmentConfig(size=cfg.image_size, **augment),
                        tracking_uri=str(cfg.tracking.uri), experiment=cfg.experiment,
                        **{m.name: OmegaConf.to_container(m.params)})
    with cli_errors():
        record = pretrain(pc)
    print(f"{m.name}: {record['steps']} steps in {record['seconds']} s, loss {record['final']['loss']:.4f} -> "
          f"{cfg.output} (sha256 {record['sha256'][:12]})")


if __name__ == "__main__":
    main()
