"""Training precision on CPUs: bf16 autocast where the CPU computes bf16 natively, fp32 elsewhere (emulated bf16 is
many times slower), recorded on the run and in the model card."""
import json
import logging
from pathlib import Path

import pytest
import torch

from rcdm import device
from rcdm.train import train

QUICK = ["train.steps=2", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2", "train.sample_every=2",
         "train.loader_workers=0", "grid.images=0", "faithfulness.images=0", "invariance.images=0",
         "diagnostic.images=0"]


def test_the_precision_is_chosen_by_capability():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    native = device.cpu_native_bf16()
    assert device.training_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert device.training_precision("auto", cuda) == "bf16" and device.training_precision("fp32", cuda) == "fp32"
    assert device.training_precision("fp32", cpu) == "fp32"
    with pytest.raises(Exception, match="train.precision=fp16 is not one of"):
        device.training_precision("fp16", cpu)


@pytest.mark.parametrize("native", [False, True])
def test_a_run_records_the_precision_it_trained_in(typed, dataset, tmp_path, monkeypatch, caplog, native):
    from mlflow.tracking import MlflowClient

    from rcdm.model_files import load_trained

    monkeypatch.setattr(device, "cpu_native_bf16", lambda: native)
    device._say_no_bf16.cache_clear()
    cfg = typed("sweep", ["encoder=dino", "level=backbone", "data=shards", f"data.url={dataset}", *QUICK,
                          "train.precision=bf16", f"storage.run_root={tmp_path / 'runs'}",
                          f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    with caplog.at_level(logging.WARNING):
        metrics = train(cfg)
    want = "bf16" if native else "fp32"
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert ("no native bf16" in caplog.text) == (not native)
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["precision"] == want and run.data.params["train.precision"] == "bf16"
    assert load_trained(cfg.run_root).card.device.endswith(f", {want}")
    # where the run's time went: setup, training (and, with them on, grids, the diagnostic and each analysis)
    timing = json.loads((Path(cfg.run_root) / "timing.json").read_text())
    assert set(timing["seconds"]) == {"setup", "training"} and timing["seconds"]["training"] > 0
    assert run.data.metrics["time_training_s"] == timing["seconds"]["training"]
