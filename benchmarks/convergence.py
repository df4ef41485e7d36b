"""How fast each training recipe learns to follow its conditioning, measured side by side in one run.

    python benchmarks/convergence.py [--out benchmarks/results/convergence.json] [--encoder vicreg]

Every arm trains the tiny UNet on the same demo data (the README's dataset: built here if missing), the same
encoder and level, batch and machine, and is stopped at its checkpoints: each stop is a resumed run of
``rcdm.train.train``, whose end-of-run evaluation gives the faithfulness protocol (64 held-out images, fixed
seeds, ddim25, guidance 1) and the conditioning gains (``cond_gain_q0..q3``). The x axis is the run's own
``train_seconds``: data, update and EMA, no evaluation. Arms: ``adm`` (the released recipe at the demo's
former lr 1e-3), ``vpred`` (the default), ``vpred_min_snr`` (the default with min-SNR-5 weighting).
Goals: ``vpred`` reaches adm's 1500-step MRR in at least 10x fewer seconds; VICReg backbone MRR >= 0.5
within 60 s of training. Every point also holds what the samples keep, factor by factor (``factor_reads.json``:
the share of samples read as their original's shape, colour, ... with 95 % intervals, chance and the embedding's
bound); the third panel plots shape against seconds. ``--arms vpred_long`` follows shape over 3600 steps;
``--arms whitened_long`` the whitened conditioning over 8400 (hours on 2 cores: ``--work DIR`` keeps the runs, and a
later call with the same ``--work`` and ``--out`` and later ``--stops`` resumes each arm where it stopped).
Writes the JSON and a PNG plot beside it.
"""
import argparse
import contextlib
import json
import logging
import signal
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline import schemas
from pipeline.stages import ensure_demo_data, train_config
from rcdm.analysis.factor_reads import FactorReads
from rcdm.analysis.faithfulness import Faithfulness
from rcdm.errors import UserError, cli_errors
from rcdm.provenance import machine
from rcdm.train import PREEMPT_SIGNAL, train
from rcdm.train_checkpoints import LATEST, latest_step

ROOT = Path(__file__).resolve().parents[1]
ARMS = {  # name: (overrides, the steps at which it is evaluated)
    "adm": (["recipe=adm", "train.lr=1e-3"], [250, 500, 1000, 1500]),
    "vpred": ([], [60, 120, 170, 240, 400]),
    "vpred_min_snr": (["recipe.weighting=min_snr", "recipe.min_snr_gamma=5"], [120, 240, 400]),
    # what the samples keep, factor by factor, over a longer run (shape is drawn late, if at all)
    "vpred_long": (["train.lr_schedule=constant"], [600, 1200, 2400, 3600]),
    # the whitened conditioning that drew shapes on the VICReg backbone (docs/training.md): hours on 2 cores
    "whitened_long": (["train.lr_schedule=constant", "recipe.whiten_embeddings=true"],
                      [1200, 2400, 3600, 4800, 6000, 7200, 8400]),
}
DEFAULT_ARMS = "adm,vpred,vpred_min_snr"


def run_arm(name: str, overrides: list[str], stops: list[int], work: Path, common: list[str],
            on_point=lambda points: None) -> list[dict]:
    """The arm trained to each stop in turn (each a resumed run), its evaluation read back; ``on_point(points)``
    after each, so that an arm of hours leaves its curve so far if it is stopped."""
    points = []
    for steps in stops:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = train_config(compose("sweep", overrides=[*common, *overrides, f"train.steps={steps}",
                                                           f"sweep_id={name}"], return_hydra_config=True))
        ensure_demo_data(cfg)
        t0 = time.perf_counter()
        m = train(cfg)  # resumes from the previous stop
        # a finished train() ignores the preemption signal (its job has nothing left to save); here the next stop
        # follows, so the signal ends the benchmark between stops, where the stop just made is checkpointed
        signal.signal(PREEMPT_SIGNAL, signal.SIG_DFL)
        numbers = json.loads((Path(cfg.run_root) / "faithfulness.json").read_text())
        faith = Faithfulness.of(numbers)
        reads = Path(cfg.run_root) / "factor_reads.json"
        factors = {k: {"samples": v.samples.value, "ci95": v.samples.ci95, "bound": v.bound, "chance": v.chance}
                   for k, v in FactorReads.of(json.loads(reads.read_text())).factors.items()} if reads.exists() else {}
        points.append({"factors": factors, "step": steps, "train_seconds": m["train_seconds"], "mrr": faith.mrr.value,
                       "mrr_ci95": faith.mrr.ci95, "top1": faith.top1.value, "guidance": numbers["guidance"],
                       **{k: m[k] for k in m if k.startswith(("cond_gain", "null_gain"))},
                       "wall_seconds_incl_eval": time.perf_counter() - t0, "machine": machine()})
        print(name, json.dumps(points[-1]), flush=True)
        on_point(points)
    return points


def first_reaching(points: list[dict], mrr: float) -> float | None:
    return next((p["train_seconds"] for p in points if p["mrr"] >= mrr), None)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    for i, (name, points) in enumerate(result["arms"].items()):
        colour = f"C{i}"
        x = [p["train_seconds"] for p in points]
        lo = [p["mrr"] - p["mrr_ci95"][0] for p in points]
        hi = [p["mrr_ci95"][1] - p["mrr"] for p in points]
        a.errorbar(x, [p["mrr"] for p in points], yerr=[lo, hi], marker="o", capsize=3, color=colour, label=name)
        b.plot(x, [p["cond_gain_q3"] for p in points], marker="o", color=colour, label=f"{name}: q3, t in [750, 1000)")
        b.plot(x, [p["cond_gain_q0"] for p in points], marker="x", linestyle=":", color=colour, label=f"{name}: q0")
        shape = [(p["train_seconds"], p["factors"]["shape"]) for p in points if p.get("factors", {}).get("shape")]
        if shape:
            c.errorbar([s for s, _ in shape], [f["samples"] for _, f in shape], marker="o", capsize=3, color=colour,
                       yerr=[[f["samples"] - f["ci95"][0] for _, f in shape], [f["ci95"][1] - f["samples"] for _, f in shape]],
                       label=f"{name}: shape")
            if shape[-1][1]["bound"] is not None:
                c.axhline(shape[-1][1]["bound"], color=colour, linestyle=":", label=f"{name}: embedding's bound")
            c.axhline(shape[-1][1]["chance"], color="grey", linestyle="--")
    c.set(xscale="log", xlabel="CPU seconds of training", ylabel="samples whose shape is the original's",
          title="what the samples keep: shape (chance dashed)", ylim=(0, 1))
    c.legend(fontsize=7)
    a.axhline(result["chance_mrr"], color="grey", linestyle="--", label="chance")
    a.set(xscale="log", xlabel="CPU seconds of training", ylabel="faithfulness MRR (64 held-out, ddim25)",
          title=f"{result['encoder']} {result['level']}, tiny UNet, batch {result['batch']}")
    b.set(xscale="log", xlabel="CPU seconds of training", ylabel="conditioning gain 1 - L_true / L_permuted",
          title="uses its embedding, per quartile of t")
    for ax in (a, b, c):
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.legend()
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/convergence.json")
    ap.add_argument("--encoder", default="vicreg")
    ap.add_argument("--level", default="backbone")
    ap.add_argument("--arms", default=DEFAULT_ARMS, help=f"any of {','.join(ARMS)} (vpred_long: about an hour on 2 cores)")
    ap.add_argument("--data", default="data/demo", help="the demo dataset (built there if missing)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    ap.add_argument("--stops", help="evaluate every arm at these steps instead of its own (e.g. 2: a smoke run)")
    ap.add_argument("--overrides", default="", help="more sweep overrides for every arm, space-separated")
    ap.add_argument("--work", help="keep the arms' runs in this folder (default: a temporary one, removed at the end). Called again "
                    "with the same --work, --out, arms and overrides and later --stops, each arm resumes its run at "
                    "its last stop and its new points join the curve in --out")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    with cli_errors(), (contextlib.nullcontext(args.work) if args.work
                        else tempfile.TemporaryDirectory(prefix="rcdm-bench-conv-")) as work:
        _run(args, Path(work))  # a temporary folder is removed at the end: the curve in --out is the result


def _earlier_points(args, out: Path, work: Path) -> dict[str, list[dict]]:
    """The points an earlier call with this --work left in --out, per arm. Stops already measured are kept and
    skipped; refused where a stop still to measure lies at or before the step the arm's checkpoint stands at (it
    would evaluate the later model under an earlier step). A run stopped before its first evaluation has no points
    yet and resumes all the same."""
    arms = {}
    if out.exists():
        old = json.loads(out.read_text())
        if (old.get("encoder"), old.get("level")) != (args.encoder, args.level):
            raise UserError(f"{out} is the curve of {old.get('encoder')} {old.get('level')}, not {args.encoder} "
                            f"{args.level}: pass that call's --encoder and --level")
        arms = {name: [{"machine": old.get("machine"), **p} for p in pts]  # points of before per-point machines
                for name, pts in old.get("arms", {}).items() if pts}
    elif list(work.glob("runs/convergence/*/*/faithfulness.json")):
        raise UserError(f"{work} holds evaluated runs but {out} has no curve of them: pass the --out of the call "
                        f"that made them")
    for name in args.arms.split(","):
        pointers = work.glob(f"runs/convergence/{name}/*/checkpoints/{LATEST}")
        last = max((latest_step(str(f.parent.parent)) for f in pointers), default=0)
        pending = _pending(args, name, arms.get(name, []))
        if pending and pending[0] <= last:
            raise UserError(f"arm {name} already stands at step {last} in {work}, past its unmeasured stop "
                            f"{pending[0]}: give --stops after {last} (e.g. --stops {last + 1200})")
    return arms


def _pending(args, name: str, before: list[dict]) -> list[int]:
    """The arm's stops (--stops, or its own) not yet measured: those after its last point."""
    stops = [int(x) for x in args.stops.split(",")] if args.stops else ARMS[name][1]
    return sorted(k for k in stops if k > (before[-1]["step"] if before else 0))


def _run(args, work: Path) -> None:
    log = logging.getLogger("rcdm")  # what training says (resuming, its evaluation), not every library's INFO
    log.setLevel(logging.INFO)
    if not log.handlers:  # once, however often main() runs in one process
        log.addHandler(logging.StreamHandler())
    schemas.register("sweep_schema")
    out = Path(args.out)
    earlier = _earlier_points(args, out, work) if args.work else {}
    work.mkdir(parents=True, exist_ok=True)
    if args.work:
        print(f"runs in {work}", flush=True)
    common = [f"encoder={args.encoder}", f"level={args.level}", f"data.url={args.data}",
              f"storage.run_root={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'm.db'}", "train.progress=false",
              "train.sample_every=100000", "train.checkpoint_every=100000", "train.log_every=100000",
              "tracking.experiment=convergence",
              # the recipes as measured: from scratch, per-dimension normalised (the demo's own jobs start from a
              # shipped decoder on whitened embeddings, configs/start/demo_tiny_vpred.yaml)
              "train.init_from=null", "recipe.whiten_embeddings=false", *args.overrides.split()]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        base = train_config(compose("sweep", overrides=common, return_hydra_config=True))
    result = {"encoder": args.encoder, "level": args.level, "batch": base.train.batch_size, "preset": base.model.name,
              "chance_mrr": sum(1 / k for k in range(1, 65)) / 64, "arms": {},
              "machine": machine(),
              "config": {name: OmegaConf.to_yaml(OmegaConf.create({"overrides": ov, "stops": st}))
                         for name, (ov, st) in ARMS.items()}}
    result["arms"].update(earlier)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(name: str, points: list[dict]) -> None:  # the curve so far
        result["arms"][name] = points
        out.write_text(json.dumps(result, indent=2))

    for name in args.arms.split(","):
        overrides = ARMS[name][0]
        before = earlier.get(name, [])
        stops = _pending(args, name, before)
        if not stops:
            print(f"{name}: every stop asked for is measured already", flush=True)
        result["arms"][name] = before + run_arm(name, overrides, stops, work, common,
                                                lambda points, n=name, b=before: save(n, b + points))
    arms = result["arms"]
    if "adm" in arms and "vpred" in arms:
        adm_final = arms["adm"][-1]
        reach = first_reaching(arms["vpred"], adm_final["mrr"])
        result["adm_final"] = {"step": adm_final["step"], "mrr": adm_final["mrr"],
                               "train_seconds": adm_final["train_seconds"]}
        result["vpred_seconds_to_adm_final_mrr"] = reach
        result["speedup_to_adm_final_mrr"] = adm_final["train_seconds"] / reach if reach else None
    if "vpred" in arms:
        at60 = [p for p in arms["vpred"] if p["train_seconds"] <= 60]
        result["vpred_best_mrr_within_60s"] = max((p["mrr"] for p in at60), default=None)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("arms", "config")}, indent=2))


if __name__ == "__main__":
    main()
