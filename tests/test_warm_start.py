"""train.init_from: a run started from another trained RCDM, whole (same encoder and level) or its decoder only."""
import json
from pathlib import Path

import pytest
import torch

from pipeline.stages import train_config
from rcdm import train_checkpoints
from rcdm.errors import UserError
from rcdm.train import train


def test_a_decoder_warm_start_copies_all_but_the_conditioning_input_across_encoders_and_levels(tmp_path, dataset,
                                                                                              compose_sweep):
    base = ["data=shards", f"data.url={dataset}", f"storage.run_root={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "train.loader_workers=0", "train.sample_every=1000",
            "train.batch_size=4", "grid.images=0", "faithfulness.images=0", "invariance.images=0",
            "diagnostic.images=0"]
    first = train_config(compose_sweep(base + ["encoder=dino", "sweep_id=first", "train.steps=2"]))
    train(first)
    source = train_checkpoints.load(train_checkpoints.latest_path(first.run_root))["ema"]
    decoder = [f"train.init_from={first.run_root}", "train.init_parts=decoder"]
    # another embedding (the projector's; the fixture holds one encoder): the conditioning input differs; lr 1e-30
    # keeps the copied weights where the warm start put them
    job = train_config(compose_sweep(base + ["encoder=dino", "level=projector", "sweep_id=second",
                                             "train.steps=1", "train.lr=1e-30", *decoder]))
    train(job)
    state = train_checkpoints.load(train_checkpoints.latest_path(job.run_root))
    ema, conditioning = state["ema"], ("ssl_emb.", "null_emb", "emb_mean", "emb_std", "emb_white")
    for k, v in source.items():
        if not k.startswith(conditioning):
            assert torch.allclose(ema[k], v, rtol=1e-6, atol=1e-20), k
    assert torch.equal(ema["ssl_emb.bias"], source["ssl_emb.bias"])
    assert ema["ssl_emb.weight"].abs().max() < 1e-20  # zero at the start: every embedding reads as the mean one
    assert not torch.equal(ema["emb_mean"], torch.zeros_like(ema["emb_mean"]))  # the job's own statistics
    assert not (ema["emb_mean"].shape == source["emb_mean"].shape and torch.equal(ema["emb_mean"], source["emb_mean"]))
    start = json.loads((Path(job.run_root) / train_checkpoints.INIT_FILE).read_text())
    assert start["parts"] == "decoder" and start["source_encoder"] == "dino backbone" and start["steps"] == 2
    # another diffusion (what the output means) is refused before any step
    x0 = train_config(compose_sweep(base + ["encoder=dino", "sweep_id=third", "recipe.prediction=x0", *decoder]))
    with pytest.raises(UserError, match=r"init_parts=decoder\) is another decoder .*diffusion Process\("):
        train(x0)
    assert train_checkpoints.latest_path(x0.run_root) is None
    with pytest.raises(UserError, match=r"^train.init_parts=whole is out of range"):
        train_config(compose_sweep(base + ["encoder=dino", "train.init_parts=whole"]))


def test_init_from_starts_a_new_run_from_a_trained_model_and_refuses_another_kind(tmp_path, dataset, compose_sweep):
    base = ["data=shards", f"data.url={dataset}", "encoder=dino", f"storage.run_root={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "train.loader_workers=0", "train.sample_every=1000",
            "train.batch_size=4", "grid.images=1", "grid.samples=1", "grid.steps=ddim2", "faithfulness.images=2",
            "faithfulness.steps=ddim2", "train.init_from=null", "train.init_parts=all"]  # the demo's start: not here
    first = train_config(compose_sweep(base + ["sweep_id=first", "train.steps=2"]))
    train(first)
    source = train_checkpoints.load(train_checkpoints.latest_path(first.run_root))
    # lr 1e-30: one update leaves the weights where init_from put them (to float32 rounding), the source's EMA
    second = train_config(compose_sweep(base + ["sweep_id=second", "train.steps=1", "train.lr=1e-30",
                                                f"train.init_from={first.run_root}"]))
    train(second)
    state = train_checkpoints.load(train_checkpoints.latest_path(second.run_root))
    for k, v in source["ema"].items():
        for got in (state["model"][k], state["ema"][k]):
            assert torch.allclose(got, v, rtol=1e-6, atol=1e-20), k
    assert not torch.equal(source["model"]["out.2.weight"], source["ema"]["out.2.weight"])  # EMA, not online
    start = json.loads((Path(second.run_root) / train_checkpoints.INIT_FILE).read_text())
    assert start["source"] == first.run_root and start["steps"] == 2
    # resumed, the run continues from its own checkpoint, not from the source again
    init = f"train.init_from={first.run_root}"
    train(train_config(compose_sweep(base + ["sweep_id=second", "train.steps=2", init])))
    assert train_checkpoints.load(train_checkpoints.latest_path(second.run_root))["step"] == 2
    # the projector level conditions on another embedding: refused before any step, nothing written
    other = train_config(compose_sweep(base + ["sweep_id=third", "level=projector", init]))
    with pytest.raises(UserError, match=r"another kind of model .*: its level backbone \(this job: projector\); UNet"):
        train(other)
    assert train_checkpoints.latest_path(other.run_root) is None
    x0 = train_config(compose_sweep(base + ["sweep_id=fifth", "recipe.prediction=x0", init]))  # same UNet, other output
    with pytest.raises(UserError, match=r"another kind of model .*: its diffusion Process\(.*prediction='v'"):
        train(x0)
    missing = train_config(compose_sweep(base + ["sweep_id=fourth", f"train.init_from={tmp_path / 'nothing'}"]))
    with pytest.raises(UserError, match=r"^train.init_from=.*nothing: checkpoint .* not found; give a checkpoint"):
        train(missing)
