"""Write the shipped demo RCDMs (rcdm/demo_models/: float16 EMA weights + a JSON record each) from the
finished runs of configs/demo_release.yaml.

    python launch/sweep.py --config-name demo_release -m encoder=vicreg,dino,barlow,simclr level=backbone,projector
    python launch/export_demo.py runs/rcdm-demo-release/demo-release
    python launch/export_demo.py --read vicreg-backbone     # only (re)read a shipped model's held-out factors

After each export (or with --read), the factor reads of the float16 file on --held-out images of the demo
generator's analysis split go into the record (factor_reads_held_out): the bar tests/test_demo_models.py
holds the shipped backbones to.
"""
import argparse
from pathlib import Path

from rcdm.demo_release import DEMO_DIR, export
from rcdm.findings import read_held_out
from rcdm.errors import UserError, cli_errors
from rcdm.stats import Estimate


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
    ap.add_argument("runs", nargs="*", help="run roots, or folders holding them (a sweep's runs)")
    ap.add_argument("--out", default=str(DEMO_DIR), help="where the .pt/.json pairs go (default: %(default)s)")
    ap.add_argument("--device", default=None,
                    help="the hardware that trained the runs, for runs whose checkpoint does not record it")
    ap.add_argument("--held-out", type=int, default=256,
                    help="images of the analysis split the exported file's factors are read on (0: none)")
    ap.add_argument("--read", nargs="+", default=[], metavar="NAME",
                    help="no export: read these models of --out (vicreg-backbone ...) on --held-out images")
    args = ap.parse_args()
    with cli_errors():
        out = Path(args.out)
        if not args.runs and not args.read:
            raise UserError("give run roots to export, or --read <model name> to re-read a model's held-out factors")
        names = list(args.read)
        for root in run_roots(args.runs) if args.runs else []:
            rec = export(str(root), out, args.device)
            f = rec["faithfulness"]
            print(f"{rec['name']}: {rec['training']['steps']} steps, {rec['training']['train_seconds'] / 60:.1f} min "
                  f"on {rec['training']['device']}; faithfulness MRR {Estimate.of(f, 'mrr').format(3)} "
                  f"-> {out / rec['weights_file']}", flush=True)
            names.append(rec["name"])
        for name in names if args.held_out > 0 else []:
            reads = read_held_out(name, out, args.held_out)["factor_reads_held_out"]["factors"]
            print(f"{name} on {args.held_out} held-out images: " + ", ".join(
                f"{k} {v['samples']:.2f} (bound {v['bound']:.2f})" for k, v in reads.items()), flush=True)


if __name__ == "__main__":
    main()
