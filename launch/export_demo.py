"""Write the shipped demo RCDMs (rcdm/demo_models/: float16 EMA weights + a JSON record each) from the
finished runs of configs/demo_release.yaml.

    python launch/sweep.py --config-name demo_release -m encoder=vicreg,dino,barlow,simclr level=backbone,projector
    python launch/export_demo.py runs/rcdm-demo-release/demo-release
"""
import argparse
from pathlib import Path

from rcdm.demo_release import DEMO_DIR, export
from rcdm.errors import UserError, cli_errors


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run roots, or folders holding them (a sweep's runs)")
    ap.add_argument("--out", default=str(DEMO_DIR), help="where the .pt/.json pairs go (default: %(default)s)")
    ap.add_argument("--device", default=None,
                    help="the hardware that trained the runs, for runs whose checkpoint does not record it")
    args = ap.parse_args()
    with cli_errors():
        for root in run_roots(args.runs):
            rec = export(str(root), Path(args.out), args.device)
            f = rec["faithfulness"]
            print(f"{rec['name']}: {rec['training']['steps']} steps, {rec['training']['train_seconds'] / 60:.1f} min "
                  f"on {rec['training']['device']}; faithfulness MRR {f['mrr']:.3f} "
                  f"[{f['mrr_ci95'][0]:.3f}, {f['mrr_ci95'][1]:.3f}] -> {Path(args.out) / rec['weights_file']}")


if __name__ == "__main__":
    main()
