"""Sample an RCDM conditioned on the embeddings of some images; one PNG grid out.

    python launch/sample.py checkpoint=rcdm_ema_dino_trunk.pt images=path/to/folder num_samples=4 steps=100
"""
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from rcdm.errors import cli_errors
from rcdm.sampling import SampleConfig, sample_grid

log = logging.getLogger("rcdm.sample")


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    with cli_errors():
        summary = sample_grid(SampleConfig(**OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)))
    print(f"wrote {summary['output']} ({len(summary['images'])} images x {cfg.num_samples} samples, "
          f"{summary['sampler']} {summary['steps']} steps, {summary['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
