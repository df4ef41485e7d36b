"""Sample an RCDM conditioned on the embeddings of some images; one PNG grid out.

    python launch/sample.py checkpoint=rcdm_ema_dino_trunk.pt images=path/to/folder num_samples=4 steps=100
"""
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import schemas
from rcdm.errors import cli_errors
from rcdm.sampling import sample_grid

log = logging.getLogger("rcdm.sample")

schemas.register("sample_schema")


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    with cli_errors():
        summary = sample_grid(OmegaConf.to_object(cfg))
    print(f"wrote {summary['output']} ({len(summary['images'])} images x {cfg.num_samples} samples, "
          f"{summary['sampler']} {summary['steps']} steps, {summary['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
