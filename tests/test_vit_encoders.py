"""The ViT releases (DINO ViT-S/16 and ViT-B/16, DINOv2 ViT-S/14 and ViT-B/14, MAE ViT-B/16): random files in
each release's on-disk layout load strictly into timm's VisionTransformer, give their declared levels and dims,
come from the hub cache under the release's file name, a wrong file is refused saying what does not fit, and
a ViT encoder goes through sharding and a training step."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from release_files import VIT_WRITERS, write_vit

from pipeline.stages import train_config
from rcdm.encoders import ENCODERS, build_encoder
from rcdm.encoders.weights import hub_cache_path
from rcdm.errors import UserError
from rcdm.sampling import SampleConfig, sample_grid
from rcdm.train import train
from sharding.config import ShardJob, SyntheticInput
from sharding.orchestrate import shard

DIMS = {"dino_vits16": {"backbone": 384, "patch_mean": 384, "projector": 256},
        "dino_vitb16": {"backbone": 768, "patch_mean": 768, "projector": 256},
        "dinov2_vits14": {"backbone": 384, "patch_mean": 384}, "dinov2_vitb14": {"backbone": 768, "patch_mean": 768},
        "mae_vitb16": {"backbone": 768, "patch_mean": 768}}


def test_every_vit_release_declares_its_levels_preprocessing_and_file():
    assert set(VIT_WRITERS) == set(DIMS) <= set(ENCODERS)
    for name, dims in DIMS.items():
        spec = ENCODERS[name]
        assert spec.levels("resnet50") == list(dims)  # the release's own arch, whatever arch= says
        assert spec.preprocess.to_dict() == {"size": 224, "crop": "center", "normalize": "imagenet", "resize": 256}
        assert spec.url.startswith("https://dl.fbaipublicfiles.com/") and spec.licence
    assert hub_cache_path(ENCODERS["dinov2_vits14"].url).name == "dinov2_vits14_pretrain.pth"


@pytest.mark.parametrize("name", sorted(DIMS))
def test_a_vit_release_loads_strictly_with_its_values(tmp_path, name):
    path = write_vit(name, tmp_path / f"{name}.pth", seed=3)
    enc = build_encoder(name, "tiny", weights=str(path))  # arch=tiny asks nothing of a ViT release
    assert enc.dims == DIMS[name] and enc.arch == VIT_WRITERS[name][1]
    x = torch.randn(2, 3, 224, 224)
    out = enc(x)
    assert {k: v.shape[1] for k, v in out.items()} == DIMS[name] and all(v.shape[0] == 2 for v in out.values())
    # the file's values are in use (not the random initialisation), and the mean patch token is not the CLS
    random_out = build_encoder(name, "tiny", weights="random")(x)
    assert not torch.allclose(out["backbone"], random_out["backbone"])
    assert not torch.allclose(out["backbone"], out["patch_mean"])
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())


def test_a_wrong_vit_file_is_refused_saying_what_does_not_fit(tmp_path):
    v2 = write_vit("dinov2_vits14", tmp_path / "v2.pth")
    with pytest.raises(UserError, match="not a dino-layout checkpoint.*missing 'teacher'"):
        build_encoder("dino_vits16", weights=str(v2))
    with pytest.raises(UserError, match=r"does not fit encoder dinov2_vitb14.*of another shape \(backbone\.cls_token "
                                        r"\(1, 1, 384\) in the file, \(1, 1, 768\) here"):
        build_encoder("dinov2_vitb14", weights=str(v2))
    dino = write_vit("dino_vits16", tmp_path / "dino.pth")
    with pytest.raises(UserError, match=r"does not fit encoder dinov2_vits14.*missing \(backbone\.cls_token.*"
                                        r"unexpected \(backbone\.backbone\.cls_token"):
        torch.save(torch.load(dino, weights_only=False)["teacher"], tmp_path / "teacher.pth")
        build_encoder("dinov2_vits14", weights=str(tmp_path / "teacher.pth"))
    with pytest.raises(UserError, match=r"does not fit encoder dino_vits16.*6 missing \(projector.*24 unexpected \(backbone\.blocks\.0\.ls1\.gamma"
                                        r".*of another shape \(backbone\.pos_embed \(1, 1370, 384\) in the file"):
        teacher = {f"backbone.{k}": v for k, v in torch.load(v2, weights_only=False).items() if k != "mask_token"}
        torch.save({"teacher": teacher}, tmp_path / "v2_as_dino.pth")
        build_encoder("dino_vits16", weights=str(tmp_path / "v2_as_dino.pth"))


def test_a_released_vit_comes_from_the_hub_cache_and_offline_names_its_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        build_encoder("dinov2_vits14", weights="released", download=False)
    cached = tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    assert ENCODERS["dinov2_vits14"].url in str(err.value) and str(cached) in str(err.value)
    cached.parent.mkdir(parents=True)
    write_vit("dinov2_vits14", cached)
    enc = build_encoder("dinov2_vits14", weights="released", download=False)
    assert enc.weights.kind == "released" and enc.dims == DIMS["dinov2_vits14"]


def test_a_vit_encoder_through_sharding_and_a_training_step(tmp_path, monkeypatch, compose_sweep):
    """The released DINOv2 ViT-S/14 (a random file in its layout, in the hub cache): shards with its CLS and
    mean-patch levels at its own 224 px preprocessing, then a training job conditions on the mean patch token
    and runs its end-of-run checks (faithfulness re-encodes the samples through the ViT)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = hub_cache_path(ENCODERS["dinov2_vits14"].url)
    cached.parent.mkdir(parents=True)
    write_vit("dinov2_vits14", cached)
    data = tmp_path / "ds"
    for split, n in (("train", 8), ("val", 4)):
        shard(ShardJob(input="synthetic", output=str(data), split=split, synthetic=SyntheticInput(n), shard_size=8,
                       image_size=32, encoders=["dinov2_vits14"], levels=["backbone", "patch_mean"], arch="resnet50",
                       loader_workers=0, batch_size=8, download=False))
    manifest = json.loads((data / "manifest.json").read_text())
    rec = manifest["encoders"]["dinov2_vits14"]
    assert rec["levels"] == {"backbone": 384, "patch_mean": 384} and rec["arch"] == "vit_small_patch14_dinov2"
    assert rec["preprocess"] == {"size": 224, "crop": "center", "normalize": "imagenet", "resize": 256}
    cfg = train_config(compose_sweep([
        "data=shards", f"data.url={data}", "encoder=dinov2_vits14", "level=patch_mean",
        f"storage.run_root={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "train.steps=1",
        "train.batch_size=4", "train.loader_workers=0", "train.log_every=1", "grid.images=2", "grid.samples=1",
        "grid.steps=ddim2", "faithfulness.images=4", "faithfulness.steps=ddim2", "invariance.images=4",
        "diagnostic.images=4"]))
    metrics = train(cfg)
    assert metrics["step"] == 1 and "faithfulness_mrr" in metrics and "invariance_grayscale" in metrics
    run = tmp_path / "runs" / "rcdm-demo" / "main" / "dinov2_vits14-patch_mean-tiny"
    # sampling embeds a new image through the same ViT, at its recorded preprocessing
    Image.new("RGB", (300, 200), "orange").save(tmp_path / "a.png")
    out = sample_grid(SampleConfig(checkpoint=str(run), images=str(tmp_path / "a.png"), num_samples=1, steps="ddim2",
                                   device="cpu", download=False, output=str(tmp_path / "grid.png")))
    assert Path(out["output"]).stat().st_size > 0
