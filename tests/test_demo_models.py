"""The demo RCDMs that ship in rcdm/demo_models: every file loads by name and matches its checksum, a damaged
one is refused, an analysis and launch/sample.py run on one, and the export that writes them round-trips."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from rcdm import demo_release, findings
from rcdm.encoders.weights import sha256sum
from rcdm.errors import UserError
from rcdm.model_files import load_checkpoint, load_trained
from rcdm.sampling import load_with_encoder

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {f"{e}-{lv}" for e in ("vicreg", "dino", "barlow", "simclr") for lv in ("backbone", "projector")}


# faithfulness MRR (64 held-out images) at least this, per level: below what the shipped files measured (backbones
# 0.78-0.92, projectors 0.58-0.69; docs/sampling.md, "The demo models"), far above chance (0.07): a file that no
# longer follows its conditioning fails
MRR_FLOOR = {"backbone": 0.7, "projector": 0.5}


def rec_backbone_colour(projector: str) -> float:
    """The held-out colour read of the backbone model of the same encoder."""
    name = projector.replace("-projector", "-backbone")
    return demo_release.record(name).factor_reads_held_out["factors"]["colour"]["samples"]


def test_every_shipped_demo_model_loads_by_name_and_matches_its_checksum():
    assert set(demo_release.available()) == EXPECTED
    total = 0
    for name in sorted(EXPECTED):
        rec = demo_release.record(name)
        path = demo_release.DEMO_DIR / rec.weights_file
        assert sha256sum(path) == rec.sha256
        total += path.stat().st_size + (demo_release.DEMO_DIR / f"{name}.json").stat().st_size
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing unpickled
        assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
        loaded, encoder = load_with_encoder(f"demo:{name}", torch.device("cpu"), download=False)
        assert (loaded.card.encoder.name, loaded.level) == tuple(name.split("-"))
        assert loaded.process.prediction == "v" and loaded.model.cfg.normalize_embeddings
        # the record says how it was made: recipe, steps, device, data and encoder digests, its faithfulness
        t, card = rec.training, rec.card
        assert card.recipe["name"] == "vpred" and t.steps >= 1000 and t.device and t.train_seconds > 0
        assert len(t.data["images_sha256"]) == 64 and len(card.encoder.weights.sha256) == 64
        assert card.encoder.weights.sha256 == encoder.weights_sha256
        f = rec.faithfulness
        assert f["n"] == 64 and f["mrr_ci95"][0] <= f["mrr"] <= f["mrr_ci95"][1]
        assert f["mrr"] > 2 * f["chance"]["mrr"]  # they follow their conditioning
        assert "cond_gain_q3" in rec.conditioning_gains
        assert rec.factor_reads["images"] == 64  # what its samples keep, read on the run's 64 held-out images
        assert f["mrr"] >= MRR_FLOOR[loaded.level], name
        held = rec.factor_reads_held_out  # this very file, read on 256 images of the analysis split
        assert held["images"] >= 256 and held["weights_sha256"] == rec.sha256, name
        if loaded.level == "backbone":  # the bar the shipped backbones are held to (docs/sampling.md)
            for reads in (rec.factor_reads["factors"], held["factors"]):
                shape = reads["shape"]
                assert shape["samples"] >= min(0.7, shape["bound"] - 0.05), (name, shape)
                assert shape["samples_ci95"][0] > shape["chance"], name  # it draws the object, beyond doubt
                for factor in ("colour", "background"):  # as far as the embedding holds it: a sample cannot draw
                    v = reads[factor]                      # what its embedding lost
                    assert v["samples"] >= min(0.9, v["bound"] - 0.05), (name, factor, v)
        else:  # the paper's picture: the projector keeps the object's shape and lets its colour go
            shape, colour = held["factors"]["shape"], held["factors"]["colour"]
            if shape["bound"] >= 0.5:  # DINO's projector embedding holds shape at 0.40 (docs/encoders.md): not there
                assert shape["samples_ci95"][0] > shape["chance"], name
            assert colour["samples"] < rec_backbone_colour(name), (name, colour)
        with torch.no_grad():  # the fp16 weights come back as a float32 model that runs
            h = torch.randn(2, loaded.model.cfg.embed_dim)
            out = loaded.model(torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), h)
        assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert total <= 25e6


def test_damaged_missing_and_unknown_demo_models_are_refused(tmp_path):
    name = "vicreg-backbone"
    for suffix in (".pt", ".json"):
        shutil.copy(demo_release.DEMO_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    assert demo_release.load_demo(f"demo:{name}", tmp_path).card.encoder.name == "vicreg"  # an intact copy loads
    data = bytearray((tmp_path / f"{name}.pt").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / f"{name}.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the sha256 .* git checkout -- rcdm/demo_models"):
        demo_release.load_demo(f"demo:{name}", tmp_path)
    (tmp_path / f"{name}.pt").unlink()
    with pytest.raises(UserError, match="is missing"):
        demo_release.load_demo(f"demo:{name}", tmp_path)
    with pytest.raises(UserError, match="no demo model demo:vicreg-middle; the shipped ones are: .*demo:dino-backbone"):
        load_checkpoint("demo:vicreg-middle")


@pytest.mark.slow
def test_an_analysis_and_the_sample_command_run_on_a_demo_model(tmp_path, typed):
    from rcdm.analysis.commands import run_analysis

    out = run_analysis(typed("analyze", ["analysis=faithfulness", "checkpoint=demo:dino-backbone",
                                         "images=synthetic:8", "steps=ddim10", "faithfulness.boot=100", f"output={tmp_path}"]))
    numbers = json.loads(Path(out["json"]).read_text())
    assert numbers["checkpoint"] == "demo:dino-backbone" and numbers["n"] == 8
    assert numbers["mrr"] > numbers["chance"]["mrr"]  # 8 images, a trained model: better than chance
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(folder / "red.png")
    env = os.environ | {"TORCH_HOME": str(tmp_path / "no-hub")}  # offline and no cache: nothing to fetch
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), "checkpoint=demo:vicreg-projector",
                        f"images={folder}", "num_samples=2", "steps=ddim5", "download=false",
                        f"output={tmp_path / 'grid.png'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(tmp_path / "grid.png").size == (2 + 3 * 34, 2 + 34)


@pytest.mark.slow
def test_export_writes_float16_weights_and_a_record_that_load_back(tmp_path, make_dataset, typed):
    from rcdm.train import train

    from rcdm.encoders import zoo

    # embedded with the encoder file the shipped simclr-projector was trained with (continued from it below)
    shipped = demo_release.record("simclr-projector").card.encoder.weights.sha256
    make_dataset(tmp_path / "ds", train=32, val=4, encoders=("simclr",),
                 encoder_weights=str(zoo.shipped_tiny("simclr", shipped)))
    cfg = typed("sweep", ["data=shards", f"data.url={tmp_path / 'ds'}", "encoder=simclr", "level=projector",
                          "train.init_from=null", "train.steps=3", "train.batch_size=4", "train.loader_workers=0",
                          "train.log_every=3",
                          "grid.images=1", "grid.samples=1", "grid.steps=ddim2", "faithfulness.images=4",
                          "faithfulness.steps=ddim2", f"storage.run_root={tmp_path / 'runs'}",
                          f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    train(cfg)
    run_root = tmp_path / "runs" / "rcdm-demo" / "main" / "simclr-projector-tiny"
    out = tmp_path / "models"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "export_demo.py"), f"runs=[{tmp_path / 'runs'}]",
                        f"out={out}", "held_out=8"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "simclr-projector: 3 steps" in r.stdout
    rec = json.loads((out / "simclr-projector.json").read_text())
    assert rec["training"]["device"].startswith("cpu: ") and rec["training"]["steps"] == 3
    assert rec["training"]["data"]["count"] == 32 and rec["faithfulness"]["n"] == 4
    assert rec["training"]["run"] == {"experiment": "rcdm-demo", "sweep_id": "main", "job_name": "simclr-projector-tiny"}
    reads = rec["factor_reads"]  # what the samples keep, factor by factor, beside the originals and the bound
    assert reads["images"] == 4 and {"shape", "colour", "background"} <= set(reads["factors"])
    assert all(0 <= v["samples"] <= 1 and "bound" in v and "chance" in v for v in reads["factors"].values())
    demo = demo_release.load_demo("demo:simclr-projector", out)
    full = load_trained(str(run_root))
    for k, v in full.model.state_dict().items():  # the EMA weights, rounded to float16 and back
        assert torch.allclose(demo.model.state_dict()[k], v, rtol=1e-3, atol=1e-4), k
    assert demo.card.process == full.card.process and demo.card.encoder == full.card.encoder

    # an unfinished run is not exported: its newest checkpoint now belongs to a 5-step run
    from rcdm import train_checkpoints

    url = train_checkpoints.latest_path(str(run_root))
    state = train_checkpoints.load(url)
    state["config"]["train"]["steps"] = 5
    torch.save(state, url)
    with pytest.raises(UserError, match="stopped at step 3 of 5"):
        demo_release.export(str(run_root), out)

    # a run continued from a shipped model (train.init_from): its record adds the source's steps and seconds
    more = typed("sweep", ["data=shards", f"data.url={tmp_path / 'ds'}", "encoder=simclr", "level=projector",
                           "sweep_id=continued", "train.init_from=demo:simclr-projector", "train.init_parts=all",
                           "train.steps=1", "recipe.whiten_embeddings=true",
                           "train.batch_size=4", "train.loader_workers=0", "grid.images=1", "grid.samples=1",
                           "grid.steps=ddim2", "faithfulness.images=4", "faithfulness.steps=ddim2",
                           f"storage.run_root={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    train(more)
    rec = demo_release.export(more.run_root, tmp_path / "continued")
    src = demo_release.record("simclr-projector")
    t = rec.training
    assert t.steps == src.training.steps + 1 and t.continued_from["run_steps"] == 1
    assert t.continued_from["sha256"] == src.sha256 and t.continued_from["source"] == "demo:simclr-projector"
    assert t.train_seconds > src.training.train_seconds
    assert t.continued_from["parts"] == "all" and t.continued_from["how"].startswith("this run's online and EMA")
    # the shipped file's factors on held-out images of the analysis split go into its record
    rec = findings.read_held_out("simclr-projector", tmp_path / "continued", images=4)
    held = rec.factor_reads_held_out
    assert held["images"] == 4 and held["weights_sha256"] == rec.sha256 and "images=synthetic:4" in held["command"]
    assert {"shape", "colour", "background"} <= set(held["factors"]) and "bound" in held["factors"]["shape"]
    assert json.loads((tmp_path / "continued" / "simclr-projector.json").read_text()) == rec.to_dict()
    assert demo_release.record("simclr-projector", tmp_path / "continued") == rec  # read back as written
