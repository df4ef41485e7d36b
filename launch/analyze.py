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
from pipeline.schemas import hydra_app
from rcdm.analysis.commands import run_analysis

main = hydra_app("analyze", run_analysis, lambda out, cfg: print(f"wrote {out['png']} and {out['json']}"))

if __name__ == "__main__":
    main()
