"""Time to the picture: the CPU seconds a demo RCDM needs before its samples draw the object as far as its
embedding holds it, per training recipe (an arm), side by side on one machine.

    python benchmarks/time_to_shape.py --work /tmp/tts                       # every arm, VICReg backbone
    python benchmarks/time_to_shape.py --arms baseline,lr2x --work /tmp/tts  # some arms; resumes them
    python benchmarks/time_to_shape.py --encoder simclr --work /tmp/tts_s --out benchmarks/results/tts_simclr.json

The bar (the release bar): on 256 held-out images of the demo generator's ``analysis`` split (no model trains on
them), the samples' shape read within 0.05 of the embedding's own 10-NN bound, colour and background read right
on at least 0.9 of them, or within 0.05 of their bound where the embedding holds less (a sample cannot draw what
its embedding lost: the current VICReg backbone holds colour at 0.42, docs/encoders.md), and faithfulness MRR at
least 0.9 (one sample per image, ddim25, guidance 1).

Every arm trains the tiny UNet on the release data (8192 demo images, the demo encoders) for one encoder and level,
and is evaluated every ``every`` steps (each stop a resumed run: the checkpoint is the stop), until it meets the bar
or spends its cap of CPU seconds (3x the 900 s goal), so a failed arm costs little. The x axis is the training
process's CPU seconds (``train_cpu_seconds``: data, update, EMA; its threads, not the evaluation), which other work
on the machine disturbs far less than wall time (recorded too). ``--work`` keeps the runs: the same command
resumes every arm where it stopped; an arm whose recipe differs from the one its run was trained with is refused.
Writes the JSON and a figure of shape against CPU seconds beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from pipeline import schemas
from pipeline.stages import ensure_demo_data, train_config
from rcdm.errors import UserError, cli_errors
from rcdm.provenance import machine
from rcdm.train import PREEMPT_SIGNAL, train

ROOT = Path(__file__).resolve().parents[1]
GOAL_CPU_S = 900.0
CAP_CPU_S = 3 * GOAL_CPU_S
BAR = {"shape_within_bound": 0.05, "colour": 0.9, "background": 0.9, "mrr": 0.9, "images": 256,
       "colour_background": "at least the value given, or its 10-NN bound minus shape_within_bound where lower"}
RELEASE = ["data.synthetic.counts={train:8192,val:64}", "recipe.whiten_embeddings=true",
           "train.lr_schedule=constant"]  # configs/demo_release.yaml: today's release recipe
# name: overrides on top of RELEASE, and the evaluation interval in steps. baseline is today's release recipe in
# fp32; every other arm runs at train.precision=auto (bf16 autocast where the CPU has native bf16, else fp32: the
# point's "precision" says which), so "bf16" is the compute lever alone and the rest are recipe levers beside it.
ARMS: dict[str, dict] = {
    "baseline": {"overrides": ["train.precision=fp32"], "every": 400},
    "bf16": {"overrides": [], "every": 400},
    "lr2x": {"overrides": ["train.lr=8e-3"], "every": 400},
    "batch64": {"overrides": ["train.batch_size=64"], "every": 200},
    "batch16": {"overrides": ["train.batch_size=16"], "every": 800},
    # the EMA's warm-up, min(decay, (1 + step) / (10 + step)), keeps the decay under 0.999 until step 8990: an
    # arm capping it there trains exactly as baseline does within the cap; 0.99 averages ~100 steps instead
    "ema99": {"overrides": ["train.ema_decay=0.99"], "every": 400},
    "no_whitening": {"overrides": ["recipe.whiten_embeddings=false"], "every": 400},
    # logit-normal timesteps (Esser et al. 2024, SD3): the middle of the noise range, where the object is decided,
    # drawn more often than its ends
    "logit_normal": {"overrides": ["recipe.timesteps=logit_normal"], "every": 400},
    # a warm start from one shared demo decoder (the shipped DINO backbone model: every weight but the conditioning
    # input, which the job learns from zero, train.init_parts=decoder); the decoder's own training is paid once, not
    # per job. The results in benchmarks/results/time_to_shape.json were measured from the v1 model (4800 steps,
    # earlier DINO encoder, sha256 5352b360...ba08e); demo:dino-backbone names the model rebuilt from it since
    "shared_decoder": {"overrides": ["train.init_from=demo:dino-backbone", "train.init_parts=decoder"],
                       "every": 200},
    # the two levers that moved shape, together
    "shared_decoder_logit_normal": {"overrides": ["train.init_from=demo:dino-backbone", "train.init_parts=decoder",
                                                  "recipe.timesteps=logit_normal"], "every": 200},
    # the shared decoder sampled from its raw weights: does the EMA's warm-up, (1 + step) / (10 + step), help or lag
    # at a budget of a few thousand steps?
    "shared_decoder_no_ema": {"overrides": ["train.init_from=demo:dino-backbone", "train.init_parts=decoder",
                                            "train.ema_decay=0"], "every": 400},
    # the shared decoder with half the batch: twice the updates per CPU second for the conditioning input to learn
    "shared_decoder_batch16": {"overrides": ["train.init_from=demo:dino-backbone", "train.init_parts=decoder",
                                             "train.batch_size=16"], "every": 400},
}


def evaluate(run_root: str, images: int, device: str = "cpu", reference_images: int = 0, reader_steps: int = 0) -> dict:
    """The bar's reads of the run's newest EMA model on ``images`` held-out images: one sample per image shared by
    the factor reads (shape, colour, background, with their 10-NN bounds) and the faithfulness MRR."""
    from rcdm.analysis import ANALYSES
    from rcdm.analysis.commands import AnalyzeConfig, inputs_for
    from rcdm.analysis.factor_reads import FactorReads
    from rcdm.analysis.faithfulness import Faithfulness
    from rcdm.device import pick_device

    cfg = AnalyzeConfig(analysis="factor_reads", checkpoint=run_root, images=f"synthetic:{images}", steps="ddim25",
                        guidance=1.0, download=False)
    cfg.factor_reads.reference_images = reference_images or cfg.factor_reads.reference_images
    cfg.factor_reads.reader_steps = reader_steps or cfg.factor_reads.reader_steps
    inputs = inputs_for(cfg, pick_device(device))
    reads = FactorReads.of(ANALYSES["factor_reads"].run(inputs, cfg.factor_reads).numbers).factors
    # the same samples (inputs caches them)
    faith = Faithfulness.of(ANALYSES["faithfulness"].run(inputs, cfg.faithfulness).numbers)
    return {"shape": reads["shape"].samples.value, "shape_ci95": list(reads["shape"].samples.ci95),
            "shape_bound": reads["shape"].bound, "colour": reads["colour"].samples.value,
            "colour_bound": reads["colour"].bound, "background": reads["background"].samples.value,
            "background_bound": reads["background"].bound, "mrr": faith.mrr.value, "mrr_ci95": list(faith.mrr.ci95)}


def meets_bar(p: dict) -> bool:
    slack = BAR["shape_within_bound"]

    def held(factor: str) -> float:  # what the bar asks of a factor the embedding may hold less of
        return min(BAR[factor], p.get(f"{factor}_bound", 1.0) - slack)

    return (p["shape"] >= p["shape_bound"] - slack and p["colour"] >= held("colour")
            and p["background"] >= held("background") and p["mrr"] >= BAR["mrr"])


def arm_config(name: str, common: list[str], steps: int):
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return train_config(compose("sweep", overrides=[*common, *RELEASE, *ARMS[name]["overrides"],
                                                            f"train.steps={steps}", f"sweep_id={name}"],
                                        return_hydra_config=True))
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"arm {name}: its overrides do not compose ({' '.join(str(e).split())[:300]})") from None


def run_arm(name: str, common: list[str], before: list[dict], images: int, save, every: int = 0,
            cap: float = CAP_CPU_S, reader: tuple[int, int] = (0, 0)) -> list[dict]:
    """The arm trained stop by stop (each a resumed run) until it meets the bar or spends its cap."""
    points, every = list(before), every or ARMS[name]["every"]
    while True:
        if points and (meets_bar(points[-1]) or points[-1]["cpu_s"] >= cap):
            return points
        steps = (points[-1]["step"] if points else 0) + every
        cfg = arm_config(name, common, steps)
        ensure_demo_data(cfg)
        m = train(cfg)  # resumes from the previous stop
        signal.signal(PREEMPT_SIGNAL, signal.SIG_DFL)  # between stops the signal ends the benchmark
        t0 = time.perf_counter()
        reads = evaluate(cfg.run_root, images, "cpu", *reader)
        points.append({"step": steps, "cpu_s": round(m["train_cpu_seconds"], 1), "wall_s": round(m["train_seconds"], 1),
                       "precision": m.get("precision"),
                       **reads, "eval_wall_s": round(time.perf_counter() - t0, 1)})
        point = points[-1]
        print(name, json.dumps(point), flush=True)
        save(name, points)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (name, arm) in enumerate(result["arms"].items()):
        pts = arm["points"]
        if not pts:
            continue
        x = [p["cpu_s"] for p in pts]
        ax.errorbar(x, [p["shape"] for p in pts], yerr=[[p["shape"] - p["shape_ci95"][0] for p in pts],
                                                          [p["shape_ci95"][1] - p["shape"] for p in pts]],
                    marker="o", capsize=3, color=f"C{i}", label=name)
    bounds = [p["shape_bound"] for a in result["arms"].values() for p in a["points"]]
    if bounds:
        ax.axhline(bounds[-1], color="black", linestyle=":", label="the embedding's 10-NN bound")
        ax.axhline(bounds[-1] - BAR["shape_within_bound"], color="grey", linestyle=":", label="the bar")
    ax.axvline(GOAL_CPU_S, color="grey", linestyle="--", label="goal: 900 CPU-s")
    ax.set(xlabel="CPU seconds of training", ylabel="samples read as the original's shape",
           title=f"{result['encoder']} {result['level']}: shape on {BAR['images']} held-out images", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(parts: list[Path], out: Path) -> dict:
    """One result from arms run side by side (each process wrote its own file): their arms together, each once."""
    result: dict = {}
    for part in parts:
        try:
            got = json.loads(part.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{part}: not a time_to_shape result ({e})") from None
        same = ("encoder", "level", "bar", "release_overrides")
        if result and any(got.get(k) != result.get(k) for k in same):
            raise UserError(f"{part} measured {got.get('encoder')} {got.get('level')} against another bar or release "
                            f"than {parts[0]}: merge results of one encoder, level and bar")
        arms = {**result.get("arms", {})}
        for name, arm in got.get("arms", {}).items():
            if name in arms:
                raise UserError(f"arm {name} is in {part} and an earlier file: merge each arm once")
            arms[name] = {**arm, "machine": got.get("machine"), "cap_cpu_s": got.get("cap_cpu_s")}
        result = {**got, **result, "arms": arms}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"cpu_s_to_bar": {n: a.get("cpu_s_to_bar") for n, a in result["arms"].items()}}, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default=",".join(ARMS), help=f"any of {', '.join(ARMS)}")
    ap.add_argument("--encoder", default="vicreg")
    ap.add_argument("--level", default="backbone")
    ap.add_argument("--data", default="data/demo_release", help="the release data (built there if missing)")
    ap.add_argument("--images", type=int, default=BAR["images"], help="held-out images of the bar (256)")
    ap.add_argument("--overrides", default="", help="more sweep overrides for every arm, space-separated")
    ap.add_argument("--work", help="keep the runs here; the same command resumes every arm (default: a temporary "
                    "folder, removed at the end)")
    ap.add_argument("--out", default="benchmarks/results/time_to_shape.json")
    ap.add_argument("--every", type=int, default=0, help="steps between evaluations (default: each arm's own)")
    ap.add_argument("--cap", type=float, default=CAP_CPU_S, help="CPU seconds after which an arm stops (3x the goal)")
    ap.add_argument("--reader", default="0,0", help="the factor reads' reference images and reader steps (0: their "
                    "defaults, 2048 and the shipped reader's)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice); two one-thread "
                    "benchmarks side by side on two cores each count their own CPU seconds")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="write --out from these results (arms run side by "
                    "side, each with its own --out), refusing two that differ in encoder, level or bar")
    args = ap.parse_args(argv)
    if args.merge:
        with cli_errors():
            return merge([Path(m) for m in args.merge], Path(args.out))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    with cli_errors():
        if unknown:
            raise UserError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
        with (contextlib.nullcontext(args.work) if args.work else
              tempfile.TemporaryDirectory(prefix="rcdm-tts-")) as work:
            return _run(args, Path(work))


def _run(args, work: Path) -> dict:
    log = logging.getLogger("rcdm")
    log.setLevel(logging.INFO)
    if not log.handlers:
        log.addHandler(logging.StreamHandler())
    schemas.register("sweep_schema")
    out = Path(args.out)
    common = [f"encoder={args.encoder}", f"level={args.level}", f"data.url={args.data}",
              f"storage.run_root={work / 'runs'}",
              f"tracking.uri=sqlite:///{work / 'm.db'}", "tracking.experiment=time_to_shape", "train.progress=false",
              "train.sample_every=100000", "train.checkpoint_every=100000", "train.log_every=100000",
              "faithfulness.images=0", "invariance.images=0", "diagnostic.images=0", "grid.images=0",
              "train.init_from=null",  # from scratch unless the arm names its start (the demo's own jobs do)
              *args.overrides.split()]
    old = json.loads(out.read_text()) if out.exists() else {}
    if old and (old.get("encoder"), old.get("level")) != (args.encoder, args.level):
        raise UserError(f"{out} holds {old.get('encoder')} {old.get('level')}, not {args.encoder} {args.level}: give "
                        f"another --out")
    result = {"machine": machine(), "encoder": args.encoder, "cap_cpu_s": args.cap,
              "level": args.level, "bar": BAR, "goal_cpu_s": GOAL_CPU_S,
              "release_overrides": RELEASE, "arms": old.get("arms", {})}
    for name in args.arms.split(","):
        overrides = [*RELEASE, *ARMS[name]["overrides"], *args.overrides.split()]
        arm = result["arms"].get(name)
        if arm and arm["overrides"] != overrides:
            raise UserError(f"arm {name} in {out} was trained with {arm['overrides']}, not {overrides}: its runs would "
                            f"mix two recipes; give another --work and --out, or the overrides it had")
        result["arms"][name] = arm or {"overrides": overrides, "points": []}
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(name: str, points: list[dict]) -> None:
        arm = result["arms"][name]
        arm["points"] = points
        hit = next((p for p in points if meets_bar(p)), None)
        arm["cpu_s_to_bar"] = hit["cpu_s"] if hit else None
        arm["steps_to_bar"] = hit["step"] if hit else None
        out.write_text(json.dumps(result, indent=1) + "\n")

    for name in args.arms.split(","):
        save(name, run_arm(name, common, result["arms"][name]["points"], args.images, save, args.every, args.cap,
                           tuple(int(v) for v in args.reader.split(","))))
    plot(result, out.with_suffix(".png"))
    reached = {n: a.get("cpu_s_to_bar") for n, a in result["arms"].items()}
    print(json.dumps({"cpu_s_to_bar": reached}, indent=1))
    return result


if __name__ == "__main__":
    main()
