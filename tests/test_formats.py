"""Files written by rcdm 0.1 still load: a dataset manifest (format 1, encoder weights as one string beside
a separate sha256) and a training checkpoint whose meta records its encoder the same way."""
import json
import shutil

import pytest
import torch

from rcdm import train_checkpoints
from rcdm.data import open_dataset
from rcdm.encoders import EncoderCard, WeightsRecord, build_encoder, build_recorded_encoder, recorded_weights
from rcdm.errors import UserError
from rcdm.sampling import load_with_encoder
from rcdm.train import train

V1_TINY_DINO = "released tiny (rcdm/encoders/tiny_weights/dino.pt)"


def _as_v1(manifest: dict) -> dict:
    """The manifest as rcdm 0.1 wrote it."""
    old = json.loads(json.dumps(manifest))
    old["format_version"] = 1
    for enc in old["encoders"].values():
        enc["sha256"] = enc["weights"]["sha256"]
        enc["weights"] = V1_TINY_DINO
    return old


def test_a_format_1_dataset_and_checkpoint_still_load_and_train(tmp_path, dataset, typed):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    v2 = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps(_as_v1(v2)))
    sha = v2["encoders"]["dino"]["weights"]["sha256"]

    info = open_dataset(str(ds), "dino", "projector")
    assert info.encoder_record.weights == WeightsRecord("released", sha) and info.embed_dim == 64

    cfg = typed("sweep", ["data=shards", f"data.url={ds}", "encoder=dino", "level=projector", "train.steps=1",
                          "train.batch_size=2", "train.loader_workers=0", "grid.images=1", "grid.samples=1",
                          "grid.steps=ddim2", "faithfulness.images=2", "faithfulness.steps=ddim2",
                          f"storage.run_root={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    metrics = train(cfg)
    assert metrics["step"] == 1 and "faithfulness_mrr" in metrics  # the recorded encoder was rebuilt and matched

    # the checkpoint as rcdm 0.1 wrote it: the encoder's weights as a string, its sha256 beside
    url = train_checkpoints.latest_path(cfg.run_root)
    state = train_checkpoints.load(url)
    card = state["meta"]
    assert card["format"] == "rcdm-model-card"
    assert card["encoder"]["weights"] == {"kind": "released", "sha256": sha, "seed": None, "path": None}
    state["meta"] = {"preset": card["preset"], "embed_dim": card["embed_dim"], "image_size": card["image_size"],
                     "encoder": "dino", "level": "projector", "encoder_arch": "tiny", "encoder_weights": V1_TINY_DINO,
                     "encoder_sha256": sha, "preprocess": card["encoder"]["preprocess"], "process": card["process"],
                     "unet": card["unet"]}
    old = tmp_path / "old.pt"
    torch.save(state, old)
    loaded, encoder = load_with_encoder(str(old), torch.device("cpu"))
    assert loaded.card.encoder.weights == WeightsRecord("released", sha) and encoder.weights.sha256 == sha


def test_format_1_weight_strings_map_to_records():
    rand = build_encoder("simclr", "tiny", "random", seed=3)
    rec = recorded_weights("random (seed 3)", "simclr", rand.weights.sha256)
    assert rec == WeightsRecord("random", rand.weights.sha256, seed=3) == rand.weights
    assert build_recorded_encoder(EncoderCard("simclr", "tiny", "backbone", rec)).weights == rec
    other = WeightsRecord("random", rand.weights.sha256, seed=4)  # another seed: other weights, refused
    with pytest.raises(UserError, match="are not those recorded"):
        build_recorded_encoder(EncoderCard("simclr", "tiny", "backbone", other))
    cached = "/elsewhere/.cache/torch/hub/checkpoints/dino_resnet50_pretrain_full_checkpoint.pth"
    assert recorded_weights(cached, "dino", "ab").kind == "released"  # the release, cached elsewhere
    gone = recorded_weights("/gone/mine.pth", "dino", "ab")
    assert gone == WeightsRecord("file", "ab", path="/gone/mine.pth")
    with pytest.raises(UserError, match="place that file at the same path"):
        build_recorded_encoder(EncoderCard("dino", "tiny", "backbone", gone))
