"""The paper's findings on the shipped demo RCDMs, from the shipped files alone (rcdm/findings.py): every
figure and table of docs/findings.md, written to docs/demo/.

    python launch/demo_findings.py                                   # all of it
    python launch/demo_findings.py output=/tmp/f images=16 steps=ddim10   # a quick look

Each part prints the launch/analyze.py command it runs; RCDM_DEMO_MODELS points at another set of models.
"""
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import schemas
from rcdm.errors import cli_errors
from rcdm.findings import run_findings

log = logging.getLogger("rcdm.findings")
schemas.register("findings_schema")


@hydra.main(version_base="1.3", config_path="../configs", config_name="findings")
def main(cfg: DictConfig) -> None:
    with cli_errors():
        cfg = OmegaConf.to_object(cfg)
        run_findings(cfg)
    print(f"wrote {cfg.output}/findings.md, findings.json and the figures")


if __name__ == "__main__":
    main()
