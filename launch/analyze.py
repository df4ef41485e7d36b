"""What an embedding keeps, as figures and numbers: interpolation, variability, faithfulness.

    python launch/analyze.py analysis=interpolate checkpoint=<run root or file> images=[a.png,b.png]
    python launch/analyze.py analysis=variability checkpoint=... images=<folder> samples=8
    python launch/analyze.py analysis=faithfulness checkpoint=... images=<folder>
"""
import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from rcdm.analysis.run import AnalyzeConfig, run_analysis
from rcdm.errors import UserError

log = logging.getLogger("rcdm.analyze")


@hydra.main(version_base="1.3", config_path="../configs", config_name="analyze")
def main(cfg: DictConfig) -> None:
    try:
        out = run_analysis(AnalyzeConfig(**OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)))
    except MissingMandatoryValue as e:
        print(f"error: {e.full_key} is required: add {e.full_key}=... to the command", file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out['png']} and {out['json']}")


if __name__ == "__main__":
    main()
