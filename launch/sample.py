"""Sample an RCDM conditioned on the embeddings of some images; one PNG grid out.

    python launch/sample.py checkpoint=rcdm_ema_dino_trunk.pt images=path/to/folder num_samples=4 steps=100
"""
import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from rcdm.errors import UserError
from rcdm.sampling import SampleConfig, sample_grid

log = logging.getLogger("rcdm.sample")


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        summary = sample_grid(SampleConfig(**OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)))
    except MissingMandatoryValue as e:
        print(f"error: {e.full_key} is required: add {e.full_key}=... to the command", file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {summary['output']} ({len(summary['images'])} images x {cfg.num_samples} samples, "
          f"{summary['sampler']} {summary['steps']} steps, {summary['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
