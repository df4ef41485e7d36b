"""Write the shipped demo RCDMs (rcdm/demo_models/: float16 EMA weights + a JSON record each) from the
finished runs of configs/demo_release.yaml.

    python launch/sweep.py --config-name demo_release -m encoder=vicreg,dino,barlow,simclr level=backbone,projector
    python launch/export_demo.py runs=[runs/rcdm-demo-release/demo-release]
    python launch/export_demo.py read=[vicreg-backbone]     # only (re)read a shipped model's held-out factors

After each export (or with read=), the factor reads of the float16 file on held_out images of the demo
generator's analysis split go into the record (factor_reads_held_out): the bar tests/test_demo_models.py
holds the shipped backbones to.
"""
import sys
from pathlib import Path

from pipeline.schemas import hydra_app
from rcdm.analysis import faithfulness
from rcdm.demo_release import DEMO_DIR, ExportConfig, export
from rcdm.errors import UserError, cli_errors
from rcdm.findings import read_held_out

# the spelling before this command was a Hydra app -> the key that replaced it
OLD_FLAGS = {"--out": "out=<folder>", "--device": "device=<hardware>", "--held-out": "held_out=<images>",
             "--read": "read=[<name>,...]"}


def refuse_old_spelling(argv: list[str]) -> None:
    """The argparse spelling (``export_demo.py <runs> --out X``) is refused with the Hydra one that replaced it."""
    takes_value = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp", "--config-dir",
                   "-cd", "--info", "--experimental-rerun"}  # Hydra's own flags and their values pass
    for before, a in zip(["", *argv], argv):
        flag = a.split("=", 1)[0]
        if before in takes_value:
            continue
        if flag in OLD_FLAGS:
            raise UserError(f"{flag} is spelled {OLD_FLAGS[flag]} now (launch/export_demo.py takes Hydra overrides: "
                            f"python launch/export_demo.py runs=[<run roots>] {OLD_FLAGS[flag]})")
        if not a.startswith("-") and "=" not in a:
            raise UserError(f"{a}: run roots are given as runs=[{a}] now (launch/export_demo.py takes Hydra overrides)")


def run_roots(paths: list[str]) -> list[Path]:
    """Every run root (a folder with checkpoints/latest.json) at or under ``paths``."""
    roots = []
    for p in map(Path, paths):
        found = [p] if (p / "checkpoints" / "latest.json").exists() else sorted(
            q.parent.parent for q in p.glob("**/checkpoints/latest.json"))
        if not found:
            raise UserError(f"no training run (checkpoints/latest.json) at or under {p}")
        roots += found
    return roots


def run(cfg: ExportConfig) -> None:
    out = Path(cfg.out) if cfg.out else DEMO_DIR
    if not cfg.runs and not cfg.read:
        raise UserError("give run roots to export, runs=[<folder>,...], or read=[<model name>] to re-read a model's "
                        "held-out factors")
    names = list(cfg.read)
    for root in run_roots(cfg.runs) if cfg.runs else []:
        rec = export(str(root), out, cfg.device)
        print(f"{rec.name}: {rec.training.steps} steps, {rec.training.train_seconds / 60:.1f} min "
              f"on {rec.training.device}; faithfulness {faithfulness.headline(rec.faithfulness)} "
              f"-> {out / rec.weights_file}", flush=True)
        names.append(rec.name)
    for name in names if cfg.held_out > 0 else []:
        reads = read_held_out(name, out, cfg.held_out).factor_reads_held_out["factors"]
        print(f"{name} on {cfg.held_out} held-out images: " + ", ".join(
            f"{k} {v['samples']:.2f} (bound {v['bound']:.2f})" for k, v in reads.items()), flush=True)


main = hydra_app("export", run)

if __name__ == "__main__":
    with cli_errors():
        refuse_old_spelling(sys.argv[1:])
    main()
