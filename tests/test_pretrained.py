"""Tiny encoders trained with their own SSL objectives: the command, the release-layout output, the checksum."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcdm.encoders import build_encoder, zoo
from rcdm.errors import UserError
from rcdm.ssl.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["vicreg", "dino", "barlow", "simclr"]
# Measured on the shipped weights (docs/encoders.md): shape beats a random trunk by 0.21-0.65, the projector loses
# 0.13-0.30 of colour and 0.10-0.16 of grayscale accuracy (not DINO's grayscale: 0.01) and 0.10-0.34 of each
# colour-jitter variable. The margins leave room for platform noise.
PROBE_MARGIN = {"shape_over_random": 0.12, "invariance": 0.02, "jitter_invariance": 0.05}


def test_missing_shipped_weights_name_the_command_that_makes_them(tmp_path, monkeypatch, typed):
    monkeypatch.setattr(zoo, "TINY_WEIGHTS", tmp_path)
    with pytest.raises(UserError, match="pretrain_encoder.py method=vicreg"):
        build_encoder("vicreg", "tiny", "released")
    out = tmp_path / "simclr.pt"
    pretrain(typed("pretrain_encoder", ["method=simclr", f"output={out}", "steps=1", "batch_size=8", "images=16",
                                        "warmup_steps=1"]))
    assert build_encoder("simclr", "tiny", "released").weights.sha256 == json.loads(
        (tmp_path / "simclr.json").read_text())["sha256"]
    out.write_bytes(out.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(UserError, match="does not match the sha256"):
        build_encoder("simclr", "tiny", "released")


@pytest.mark.parametrize("method", METHODS)
def test_short_pretraining_writes_a_release_layout_file(tmp_path, method, typed):
    out = tmp_path / f"{method}.pt"
    record = pretrain(typed("pretrain_encoder", [f"method={method}", f"output={out}", "steps=3", "batch_size=16",
                                                 "images=64", "warmup_steps=1", "method.augment.local_crops=2"]))
    assert record["steps"] == 3 and torch.isfinite(torch.tensor(record["final"]["loss"]))
    enc = build_encoder(method, "tiny", str(out))  # strict load through the release layout reader
    assert enc.weights.sha256 == json.loads(out.with_suffix(".json").read_text())["sha256"]
    assert not torch.equal(enc.backbone.conv1.weight, build_encoder(method, "tiny", "random").backbone.conv1.weight)


@pytest.mark.parametrize("override,fix", [
    ("method.name=mocov3", "choose method="), ("steps=0", "positive number of steps"),
    ("batch_size=64", "lower batch_size or raise images"), ("lr=-1", "positive number"),
    ("output=enc.bin", "must end in .pt"), ("method.augment.jitter=[0.8,0.8,0.8,0.9]", "hue <= 0.5"),
])
def test_a_pretraining_config_that_cannot_train_is_one_error(tmp_path, typed, override, fix):
    out = tmp_path / "e.pt"
    with pytest.raises(UserError, match=fix):
        pretrain(typed("pretrain_encoder", [f"output={out}", "images=32", "batch_size=16", "tracking.uri=null", override]))
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_an_interrupted_pretraining_resumes_where_it_stopped(tmp_path, method, typed):
    """Killed between resume points, a rerun of the same command continues from the last one and writes the same
    file an uninterrupted run writes; a resume point of another config is refused, not mixed in."""
    args = [f"method={method}", "steps=6", "batch_size=8", "images=32", "warmup_steps=2", "checkpoint_every=2",
            "tracking.uri=null"]
    whole = pretrain(typed("pretrain_encoder", [*args, f"output={tmp_path / 'whole.pt'}"]))
    out = tmp_path / "cut.pt"

    def cut(step, encoder):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(typed("pretrain_encoder", [*args, f"output={out}"]), every=1, on_step=cut)
    assert not out.exists() and (tmp_path / "cut.resume.pt").exists()
    with pytest.raises(UserError, match="another config"):
        pretrain(typed("pretrain_encoder", [*args, f"output={out}", "lr=0.01"]))
    steps = []
    resumed = pretrain(typed("pretrain_encoder", [*args, f"output={out}"]), every=1,
                       on_step=lambda step, encoder: steps.append(step))
    assert steps == [5, 6]  # from the resume point at step 4
    assert resumed["sha256"] == whole["sha256"] and resumed["steps"] == 6
    assert not (tmp_path / "cut.resume.pt").exists()


def test_pretrain_command_logs_to_mlflow(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain_encoder.py"), "method=barlow", "steps=2",
                        "batch_size=16", "images=32", "warmup_steps=1", f"output={tmp_path / 'b.pt'}",
                        f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.search_runs([client.get_experiment_by_name("rcdm-encoders").experiment_id])[0]
    assert run.info.status == "FINISHED" and "loss" in run.data.metrics


# --- the shipped encoders ------------------------------------------------------------------------------

def test_shipped_tiny_encoders_are_the_default_and_checksummed(tmp_path):

    from rcdm.encoders.weights import sha256sum
    from sharding.config import ShardJob, SyntheticInput
    from sharding.orchestrate import shard

    for m in METHODS:
        record = json.loads((zoo.TINY_WEIGHTS / f"{m}.json").read_text())
        assert record["method"] == m and record["steps"] == record["config"]["steps"] >= 1000
        assert build_encoder(m, "tiny").weights.sha256 == record["sha256"] == sha256sum(zoo.TINY_WEIGHTS / f"{m}.pt")
    from hydra import compose, initialize_config_dir

    from pipeline import schemas

    schemas.register()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        assert compose("shard").encoder_weights == "released"  # what launch/shard.py runs with
    from rcdm.config import DemoData

    assert DemoData().encoder_weights == "released"  # the demo (configs/data/demo.yaml) keeps the default
    # the manifest says which weights embedded the data
    shard(ShardJob(input="synthetic", output=str(tmp_path / "ds"), synthetic=SyntheticInput(4), encoders=["barlow"],
                   loader_workers=0))
    enc = json.loads((tmp_path / "ds" / "manifest.json").read_text())["encoders"]["barlow"]
    assert enc["weights"] == {"kind": "released", "seed": None, "path": None,
                              "sha256": json.loads((zoo.TINY_WEIGHTS / "barlow.json").read_text())["sha256"]}


def test_earlier_shipped_encoders_serve_what_was_made_with_them():
    """A dataset or model records its encoder's sha256: the encoder shipped before the current one is found by it
    (every shipped demo model's among them), a typed weights=released is the current one, and a sha256 rcdm does
    not ship is one clear error."""
    from rcdm.encoders.weights import WeightsRecord, sha256sum

    for version in zoo.EARLIER_TINY:
        for m in METHODS:
            old = json.loads((zoo.TINY_WEIGHTS / version / f"{m}.json").read_text())["sha256"]
            assert old != json.loads((zoo.TINY_WEIGHTS / f"{m}.json").read_text())["sha256"]
            assert sha256sum(zoo.shipped_tiny(m, old)) == old
            assert build_encoder(m, "tiny", WeightsRecord("released", old)).weights.sha256 == old
    for record in sorted((ROOT / "rcdm" / "demo_models").glob("*.json")):
        card = json.loads(record.read_text())["card"]["encoder"]
        assert sha256sum(zoo.shipped_tiny(card["name"], card["weights"]["sha256"])) == card["weights"]["sha256"]
    with pytest.raises(UserError, match="does not ship"):
        zoo.shipped_tiny("vicreg", "0" * 64)


def test_colour_adjustment_factors_do_what_they_say():
    """The jitter's four variables, set by hand as the jitter probe sets them."""
    from rcdm.ssl.augment import _gray, adjust_colour

    x = 0.3 + 0.4 * torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # rotations stay in gamut
    one, zero = torch.ones(4), torch.zeros(4)
    assert torch.allclose(adjust_colour(x, one, one, one, zero), x, atol=1e-5)
    assert torch.allclose(adjust_colour(x, one, one, one, one), x, atol=1e-5)  # a full turn of hue
    assert torch.allclose(adjust_colour(x, one / 2, one, one, zero), x / 2, atol=1e-5)
    grey = adjust_colour(x, one, one, zero, zero)
    assert torch.allclose(grey, _gray(x).expand_as(x), atol=1e-5)
    turned = adjust_colour(x, one, one, one, one / 3)
    assert (turned - x).abs().max() > 0.1 and torch.allclose(_gray(turned), _gray(x), atol=1e-4)  # hue keeps luma


@pytest.fixture(scope="module")
def probe_set():
    from rcdm.probes import synthetic_set

    return synthetic_set(1500, 7, "probe")  # a split neither the encoders nor the demo RCDMs saw


@pytest.fixture(scope="module")
def probes(probe_set):
    """{method: (trained probe results, random-trunk probe results)}, computed once."""
    from rcdm.probes import probe_encoder

    return {m: (probe_encoder(build_encoder(m, "tiny", "released"), *probe_set),
                probe_encoder(build_encoder(m, "tiny", "random"), *probe_set)) for m in METHODS}


@pytest.fixture(scope="module")
def jitter_probes(probe_set):
    """{method: probe_jitter results of the shipped weights}, computed once."""
    from rcdm.probes import probe_jitter

    return {m: probe_jitter(build_encoder(m, "tiny", "released"), *probe_set) for m in METHODS}


DINO_GREY_KEPT = pytest.mark.xfail(strict=True, reason="the shipped tiny DINO's projector keeps grayscale almost as "
                                   "well as its backbone (linear probe 0.98 against 1.00, margin 0.02), though it drops "
                                   "the jitter's variables and the palette colour: measured, docs/encoders.md")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_trained_backbones_carry_every_factor_and_learned_shape(method, probes):
    """Linear probes on frozen embeddings (fixed seeds, 70/30 split): the backbone predicts every factor
    well above chance, and shape (which no augmentation randomises) far better than a random trunk."""
    trained, random_trunk = probes[method]
    backbone, chance = trained["backbone"], trained["chance"]
    for factor, acc in backbone.items():
        assert acc >= chance[factor] + 0.25 * (1 - chance[factor]), (factor, acc, chance[factor])
    assert backbone["shape"] >= random_trunk["backbone"]["shape"] + PROBE_MARGIN["shape_over_random"], (
        backbone["shape"], random_trunk["backbone"]["shape"])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_projectors_are_more_invariant_to_colour_jitter(method, jitter_probes):
    """Colour jitter is in every method's augmentations: the projector must carry less of it than the backbone
    (the paper's finding 2), by a margin. It is probed through its own random variables: the same images at five
    brightness, contrast, saturation and hue settings spanning the augmentation's range, the probe predicting the
    setting."""
    jitter = jitter_probes[method]
    for variable, backbone_acc in jitter["backbone"].items():
        assert backbone_acc >= jitter["chance"][variable] + 0.1, (variable, jitter["backbone"])  # it is visible
        assert jitter["projector"][variable] <= backbone_acc - PROBE_MARGIN["jitter_invariance"], (
            variable, jitter["projector"], jitter["backbone"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vicreg", pytest.param("dino", marks=DINO_GREY_KEPT), "barlow", "simclr"])
def test_projectors_are_more_invariant_to_grayscale(method, probes):
    """Random grayscale is in every method's augmentations: the projector carries less of it, by a margin."""
    trained, _ = probes[method]
    assert trained["projector"]["grayscale"] <= trained["backbone"]["grayscale"] - PROBE_MARGIN["invariance"], (
        trained["projector"], trained["backbone"])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_projectors_carry_less_object_colour(method, probes):
    """The palette colour of the object, which the jitter perturbs without randomising it, is also less
    decodable from the projector than from the backbone."""
    trained, _ = probes[method]
    assert trained["projector"]["colour"] <= trained["backbone"]["colour"] - PROBE_MARGIN["invariance"], (
        trained["projector"], trained["backbone"])


@pytest.mark.slow
def test_dino_prototypes_follow_colour_and_background(probe_set):
    """Why the v1 tiny DINO's projector kept the palette colour (jitter at half strength): its teacher's prototype
    assignment carries most of the object and background colour and little of the shape, against the same number of
    random clusters. The current DINO (SimCLR-strength jitter) carries much less of the object colour."""
    from rcdm.encoders.weights import WeightsRecord
    from rcdm.probes import assignment_information, dino_prototype_assignment

    images, factors = probe_set
    info, base = {}, {}
    for version in ("v1", "current"):
        folder = zoo.TINY_WEIGHTS / version if version != "current" else zoo.TINY_WEIGHTS
        sha = json.loads((folder / "dino.json").read_text())["sha256"]
        checkpoint = torch.load(zoo.shipped_tiny("dino", sha), map_location="cpu", weights_only=True)
        encoder = build_encoder("dino", "tiny", WeightsRecord("released", sha))
        assignment = dino_prototype_assignment(encoder, checkpoint, images)
        shuffled = assignment[torch.randperm(len(assignment), generator=torch.Generator().manual_seed(0))]
        info[version], base[version] = assignment_information(assignment, factors), assignment_information(shuffled,
                                                                                                             factors)
    for factor in ("colour", "background"):
        assert info["v1"][factor] >= base["v1"][factor] + 0.5 and info["v1"][factor] >= info["v1"]["shape"] + 0.4, info
    assert info["current"]["colour"] <= info["v1"]["colour"] - 0.3, info


def test_a_demo_dataset_of_earlier_encoders_is_stale_and_refused_with_the_fix(tmp_path, monkeypatch, typed):
    """After new tiny encoders ship, a demo dataset embedded with the earlier ones is never mixed with them: the sweep
    refuses it, naming the earlier encoders and the fix, and builds nothing over it."""
    import shutil

    from pipeline.stages import ensure_demo_data

    shipped = tmp_path / "tiny_weights"
    shipped.mkdir()
    for ext in ("pt", "json"):
        shutil.copy(zoo.TINY_WEIGHTS / f"simclr.{ext}", shipped / f"simclr.{ext}")
    monkeypatch.setattr(zoo, "TINY_WEIGHTS", shipped)
    demo = tmp_path / "demo"
    cfg = typed("sweep", ["data=demo", f"data.url={demo}", "data.synthetic.counts={train: 4, val: 2}",
                          "data.synthetic.encoders=[simclr]", "encoder=simclr", f"storage.run_root={tmp_path / 'r'}"])
    ensure_demo_data(cfg)
    built = (demo / "manifest.json").read_text()
    (shipped / "v1").mkdir()
    for ext in ("pt", "json"):  # as `launch/retention.py ship_from=... ship_earlier=v1` leaves them
        (shipped / f"simclr.{ext}").rename(shipped / "v1" / f"simclr.{ext}")
    pretrain(typed("pretrain_encoder", ["method=simclr", f"output={shipped / 'simclr.pt'}", "steps=1", "batch_size=8",
                                        "images=16", "warmup_steps=1", "tracking.uri=null"]))
    with pytest.raises(UserError, match=r"is stale: it was embedded with the tiny simclr encoder an earlier rcdm "
                                        r"shipped \(v1.*delete .*demo to rebuild it"):
        ensure_demo_data(cfg)
    assert (demo / "manifest.json").read_text() == built
