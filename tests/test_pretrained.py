"""Tiny encoders trained with their own SSL objectives: the command, the release-layout output, the checksum."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcdm.encoders import build_encoder, zoo
from rcdm.errors import UserError
from rcdm.ssl.augment import AugmentConfig
from rcdm.ssl.pretrain import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["vicreg", "dino", "barlow", "simclr"]
# Measured on the shipped weights (README table): shape beats a random trunk by 0.18-0.42, the projector
# loses 0.036-0.27 of colour and grayscale accuracy (not DINO's colour). The margins leave room for platform noise.
PROBE_MARGIN = {"shape_over_random": 0.12, "invariance": 0.02}


def test_missing_shipped_weights_name_the_command_that_makes_them(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "TINY_WEIGHTS", tmp_path)
    with pytest.raises(UserError, match="pretrain_encoder.py method=vicreg"):
        build_encoder("vicreg", "tiny", "released")
    out = tmp_path / "simclr.pt"
    pretrain(PretrainConfig(method="simclr", output=str(out), steps=1, batch_size=8, images=16, warmup_steps=1))
    assert build_encoder("simclr", "tiny", "released").describe()["sha256"] == json.loads(
        (tmp_path / "simclr.json").read_text())["sha256"]
    out.write_bytes(out.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(UserError, match="does not match the sha256"):
        build_encoder("simclr", "tiny", "released")


@pytest.mark.parametrize("method", METHODS)
def test_short_pretraining_writes_a_release_layout_file(tmp_path, method):
    out = tmp_path / f"{method}.pt"
    record = pretrain(PretrainConfig(method=method, output=str(out), steps=3, batch_size=16, images=64, warmup_steps=1,
                                     augment=AugmentConfig(local_crops=2 if method == "dino" else 0)))
    assert record["steps"] == 3 and torch.isfinite(torch.tensor(record["final"]["loss"]))
    enc = build_encoder(method, "tiny", str(out))  # strict load through the release layout reader
    assert enc.describe()["sha256"] == json.loads(out.with_suffix(".json").read_text())["sha256"]
    assert not torch.equal(enc.backbone.conv1.weight, build_encoder(method, "tiny", "random").backbone.conv1.weight)


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
    from omegaconf import OmegaConf

    from rcdm.encoders.weights import sha256sum
    from sharding.encode import ShardJob
    from sharding.run import shard

    for m in METHODS:
        record = json.loads((zoo.TINY_WEIGHTS / f"{m}.json").read_text())
        assert record["method"] == m and record["steps"] == record["config"]["steps"] >= 1000
        assert build_encoder(m, "tiny").describe()["sha256"] == record["sha256"] == sha256sum(zoo.TINY_WEIGHTS / f"{m}.pt")
    assert OmegaConf.load(ROOT / "configs/shard.yaml").encoder_weights == "released"
    assert OmegaConf.load(ROOT / "configs/data/demo.yaml").synthetic.encoder_weights == "released"
    # the manifest says which weights embedded the data
    shard(ShardJob(input="synthetic", output=str(tmp_path / "ds"), synthetic_count=4, encoders=["barlow"],
                   loader_workers=0))
    enc = json.loads((tmp_path / "ds" / "manifest.json").read_text())["encoders"]["barlow"]
    assert enc["weights"] == "released tiny (rcdm/encoders/tiny_weights/barlow.pt)"
    assert enc["sha256"] == json.loads((zoo.TINY_WEIGHTS / "barlow.json").read_text())["sha256"]


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


DINO_COLOUR_KEPT = pytest.mark.xfail(strict=True, reason="the shipped tiny DINO's projector keeps object colour "
                                     "(linear probe 0.99 -> 0.98, margin 0.02; grayscale drops 0.99 -> 0.94); "
                                     "its 1500-step predecessor dropped colour but had learned no shape: open in "
                                     "issue 6")


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
@pytest.mark.parametrize("method", ["vicreg", pytest.param("dino", marks=DINO_COLOUR_KEPT), "barlow", "simclr"])
def test_projectors_are_more_invariant_to_colour_and_grayscale(method, probes):
    """Colour jitter and random grayscale are in every method's augmentations: the projector must carry
    less of them than the backbone (the paper's finding 2), by a margin."""
    trained, random_trunk = probes[method]
    for factor in ("colour", "grayscale"):
        assert trained["projector"][factor] <= trained["backbone"][factor] - PROBE_MARGIN["invariance"], (
            factor, trained["projector"], trained["backbone"])
