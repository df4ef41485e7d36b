"""Train a tiny encoder with its own SSL objective on the synthetic images.

    python launch/pretrain_encoder.py method=simclr
"""
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import schemas
from rcdm.errors import cli_errors
from rcdm.ssl.pretrain import pretrain

log = logging.getLogger("rcdm.pretrain")
schemas.register("pretrain_schema")


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain_encoder")
def main(cfg: DictConfig) -> None:
    with cli_errors():
        record = pretrain(OmegaConf.to_object(cfg))
    print(f"{record['method']}: {record['steps']} steps in {record['seconds']} s, "
          f"loss {record['final']['loss']:.4f} -> {cfg.output} (sha256 {record['sha256'][:12]})")


if __name__ == "__main__":
    main()
