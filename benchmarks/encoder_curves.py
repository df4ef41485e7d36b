"""What a tiny encoder's levels keep against its pretraining steps: the demo encoders' goals (issue: the
backbone keeps shape and colour, the projector keeps shape and drops colour) read along the run.

    python benchmarks/encoder_curves.py --method simclr --every 500 \
        --overrides "method.augment.jitter=[0.8,0.8,0.8,0.2] images=16384" --out benchmarks/results/encoder_curve_simclr.json

Each point: the step, the process's CPU seconds and wall seconds of pretraining so far (evaluation excluded), and
per level the 10-NN vote and the linear probe of shape and colour (launch/retention.py's estimates, Wilson 95 %
intervals) on the demo generator's held-out analysis split. The run's final file is written where --output says
(default: a scratch folder), so the curve's last point is the file a retention table would read.
``--projector-width`` widens the tiny VICReg or Barlow Twins projector, ``--projector-depth`` deepens VICReg's, and
``--trunk-blocks`` deepens the tiny trunk (experiments on what the backbone keeps; such encoders are not ones rcdm
loads afterwards).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline import schemas
    from rcdm.provenance import machine
    from rcdm.retention import embed_for, level_retention, synthetic_labelled

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--overrides", default="", help="launch/pretrain_encoder.py overrides, space-separated")
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--train-images", type=int, default=2048)
    ap.add_argument("--test-images", type=int, default=512)
    ap.add_argument("--output", default=None, help="the encoder file (default: a scratch folder)")
    ap.add_argument("--out", required=True, help="the curve's JSON")
    ap.add_argument("--projector-width", type=int, default=None,
                    help="VICReg / Barlow Twins only: the tiny projector's width (shipped: 256), an experiment on what "
                         "the backbone keeps")
    ap.add_argument("--projector-depth", type=int, default=None,
                    help="VICReg only: hidden Linear-BN-ReLU layers of the tiny projector (shipped: 2)")
    ap.add_argument("--trunk-blocks", type=int, default=None,
                    help="BasicBlocks per stage of the tiny trunk (shipped: 1; ResNet-18's layout: 2), an experiment")
    a = ap.parse_args(argv)
    if (a.projector_width is not None and a.projector_width < 1) or (a.projector_depth is not None
                                                                      and a.projector_depth < 1):
        ap.error("--projector-width and --projector-depth take positive numbers")
    if a.trunk_blocks is not None and a.trunk_blocks < 1:
        ap.error("--trunk-blocks takes a positive number")
    if a.projector_width and a.method not in ("vicreg", "barlow"):
        ap.error("--projector-width is for --method vicreg or barlow")
    # Only VICReg's layout (its state dict as it is) takes a head of another depth: VISSL's (Barlow Twins, SimCLR)
    # and DINO's name a fixed number of layers, so a deeper head would train and then fail to be written as the
    # release file the run ends with
    if a.projector_depth and a.method != "vicreg":
        ap.error("--projector-depth is for --method vicreg only: Barlow Twins' release layout (VISSL's) names a fixed "
                 "number of head layers")
    if a.projector_width or a.projector_depth:
        from rcdm.encoders import zoo

        width, depth = a.projector_width or 256, a.projector_depth or 2
        head = zoo._barlow_head if a.method == "barlow" else (lambda d, w: zoo._vicreg_head(d, w, depth))
        zoo.ENCODERS[a.method].projector["tiny"] = (width, lambda d: head(d, width))  # this process only
    if a.trunk_blocks:
        from rcdm.encoders import backbones

        def trunk() -> tuple[nn.Module, int]:
            net = backbones.TinyResNet(blocks=a.trunk_blocks)
            return net, net.out_dim

        backbones.ARCHES["tiny"] = trunk  # this process only
    schemas.register("pretrain_schema")
    scratch = tempfile.mkdtemp(prefix="rcdm-curve-")
    output = a.output or f"{scratch}/{a.method}.pt"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("pretrain_encoder", overrides=[f"method={a.method}", f"output={output}",
                                                                         *a.overrides.split()]))
    data = synthetic_labelled(a.train_images + a.test_images, cfg.image_size)
    labels = {k: v for k, v in data.labels.items() if k in ("shape", "colour")}
    points, spent = [], {"cpu": 0.0, "wall": 0.0}
    mark = {"cpu": time.process_time(), "wall": time.perf_counter()}

    parameters = {}

    def on_step(step: int, encoder) -> None:
        parameters.update({key: sum(p.numel() for p in part.parameters())  # what this run trains, as built
                           for key, part in (("trunk", encoder.backbone), ("projector", encoder.projector))})
        spent["cpu"] += time.process_time() - mark["cpu"]
        spent["wall"] += time.perf_counter() - mark["wall"]
        feats = {k: v.cpu() for k, v in embed_for(encoder, data.images).items()}
        levels = {lv: level_retention(f, labels, a.train_images, 10) for lv, f in feats.items()}
        points.append({"step": step, "cpu_s": round(spent["cpu"], 1), "wall_s": round(spent["wall"], 1),
                       "levels": levels})
        print(f"step {step} ({spent['cpu']:.0f} CPU-s): " + "; ".join(
            f"{lv} " + ", ".join(f"{f} {r['knn']['value']:.2f}/{r['probe']['value']:.2f}" for f, r in row.items())
            for lv, row in levels.items()), flush=True)
        mark.update(cpu=time.process_time(), wall=time.perf_counter())

    from rcdm.ssl.pretrain import pretrain

    try:
        record = pretrain(cfg, a.every, on_step)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the default encoder file: the curve is what is kept
    out = {"machine": machine(), "method": a.method, "projector_width": a.projector_width,
           "projector_depth": a.projector_depth, "trunk_blocks": a.trunk_blocks,
           "parameters": parameters,
           "overrides": a.overrides.split(), "config": record["config"], "file_sha256": record["sha256"],
           "eval": {"train_images": a.train_images, "test_images": a.test_images,
                    "images": data.source, "estimates": "value [95 % Wilson interval]; knn: 10-NN vote, probe: "
                                                        "logistic regression on standardised embeddings"},
           "points": points}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
