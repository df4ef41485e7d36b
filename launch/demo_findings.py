"""The paper's findings on the shipped demo RCDMs, from the shipped files alone (rcdm/findings.py): every
figure and table of docs/findings.md, written to docs/demo/.

    python launch/demo_findings.py                                   # all of it
    python launch/demo_findings.py output=/tmp/f images=16 steps=ddim10   # a quick look

Each part prints the launch/analyze.py command it runs; RCDM_DEMO_MODELS points at another set of models.
"""
from pipeline.schemas import hydra_app
from rcdm.findings import run_findings

main = hydra_app("findings", run_findings,
                 lambda _, cfg: print(f"wrote {cfg.output}/findings.md, findings.json and the figures"))

if __name__ == "__main__":
    main()
