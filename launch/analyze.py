"""What an embedding keeps, as figures and numbers: interpolation, variability, faithfulness,
manipulation, invariance and adversarial probes, FID / IS / precision-recall.

    python launch/analyze.py analysis=interpolate checkpoint=<run root or file> images=[a.png,b.png]
    python launch/analyze.py analysis=variability checkpoint=... images=<folder> variability.samples=8
    python launch/analyze.py analysis=faithfulness checkpoint=... images=<folder>
    python launch/analyze.py analysis=manipulate checkpoint=... images=<folder> manipulate.source=a.png \
        manipulate.target=b.png
    python launch/analyze.py analysis=invariance checkpoint=[<backbone run>,<projector run>] images=synthetic:64
    python launch/analyze.py analysis=adversarial checkpoint=... images=synthetic:128
    python launch/analyze.py analysis=fidelity checkpoint=... images=<folder> [fidelity.features=encoder]
"""
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import schemas
from rcdm.analysis.commands import run_analysis
from rcdm.errors import cli_errors

log = logging.getLogger("rcdm.analyze")

schemas.register("analyze_schema")


@hydra.main(version_base="1.3", config_path="../configs", config_name="analyze")
def main(cfg: DictConfig) -> None:
    with cli_errors():
        out = run_analysis(OmegaConf.to_object(cfg))
    print(f"wrote {out['png']} and {out['json']}")


if __name__ == "__main__":
    main()
