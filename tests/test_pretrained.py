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
