"""The encoder zoo loads each release's layout strictly and reports what it cannot load."""
import pytest
import torch
from PIL import Image
from release_files import WRITERS

from rcdm.encoders import ENCODERS, build_encoder
from rcdm.encoders.weights import WeightsRecord, hub_cache_path, sha256sum
from rcdm.errors import UserError
from rcdm.preprocess import Preprocess, center_crop

TINY_DIMS = {"vicreg": 256, "dino": 64, "barlow": 256, "simclr": 32}


RESNETS = sorted(WRITERS)  # the ResNet methods; the ViT releases are tested in test_vit_encoders.py


def test_registry_covers_the_methods_and_declares_dims():
    assert set(ENCODERS) == {"vicreg", "dino", "barlow", "simclr", "supervised", "dino_vits16", "dino_vitb16",
                             "dinov2_vits14", "dinov2_vitb14", "mae_vitb16"}
    dims = {n: build_encoder(n, "tiny", "random").dims for n in RESNETS}
    assert dims["supervised"] == {"backbone": 128}
    for n, d in TINY_DIMS.items():
        assert dims[n] == {"backbone": 128, "projector": d}


@pytest.mark.parametrize("name", RESNETS)
def test_release_layout_loads_strictly_with_its_values(tmp_path, name):
    path = tmp_path / f"{name}.pth"
    WRITERS[name](path, "tiny", seed=3)
    enc = build_encoder(name, "tiny", weights=str(path))
    random_enc = build_encoder(name, "tiny", weights="random")
    x = torch.randn(4, 3, 32, 32)
    out = enc(x)
    assert out["backbone"].shape == (4, 128)
    if name != "supervised":
        assert out["projector"].shape == (4, TINY_DIMS[name])
    # the file's values are in use, BN statistics included (not the random initialisation)
    bn = enc.backbone.bn1
    assert not torch.equal(bn.running_var, random_enc.backbone.bn1.running_var)
    assert not torch.allclose(out["backbone"], random_enc(x)["backbone"])
    assert enc.describe()["weights"] == {"kind": "file", "sha256": sha256sum(path), "seed": None, "path": str(path)}
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())


def test_wrong_method_file_is_refused_with_the_path(tmp_path):
    path = tmp_path / "vicreg.pth"
    WRITERS["vicreg"](path, "tiny")
    with pytest.raises(UserError, match="not a dino-layout checkpoint"):
        build_encoder("dino", "tiny", weights=str(path))
    barlow = tmp_path / "barlow.torch"
    WRITERS["barlow"](barlow, "tiny")
    with pytest.raises(UserError, match="does not fit encoder simclr"):  # VISSL layout, other head
        build_encoder("simclr", "tiny", weights=str(barlow))


def test_released_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = hub_cache_path(ENCODERS["dino"].url)
    assert cached == tmp_path / "hub" / "checkpoints" / "dino_resnet50_pretrain_full_checkpoint.pth"
    cached.parent.mkdir(parents=True)
    WRITERS["dino"](cached, "resnet50")
    enc = build_encoder("dino", "resnet50", weights="released", download=False)
    assert enc.dims == {"backbone": 2048, "projector": 256}
    assert enc(torch.randn(2, 3, 64, 64))["projector"].shape == (2, 256)
    assert enc.weights == WeightsRecord("released", sha256sum(cached))  # where this machine caches it: no part


def test_missing_weights_offline_name_url_and_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        build_encoder("vicreg", "resnet50", weights="released", download=False)
    msg = str(err.value)
    assert ENCODERS["vicreg"].url in msg
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50_fullckpt.pth") in msg


def test_unknown_names_list_the_choices():
    with pytest.raises(UserError, match="barlow.*dino.*simclr.*supervised.*vicreg"):
        build_encoder("mocov3", "tiny", "random")
    with pytest.raises(UserError, match="resnet50.*tiny"):
        build_encoder("dino", "vit_small", "random")


def test_official_preprocessing_box_halves_then_bicubic_center_crops():
    # 1000x600 -> box-halve to 500x300 (short side 300 < 448) -> bicubic 373x224 -> centre 224 crop
    img = Image.new("RGB", (1000, 600), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 200, 600))  # a blue band on the left, cropped away by the centre crop
    out = center_crop(img, 224)
    assert out.size == (224, 224)
    x = Preprocess()(img)
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[:, 112, 112], torch.tensor([1.0, -1.0, -1.0]))  # red, scaled to [-1, 1]
    assert x.min() >= -1 and x.max() <= 1
    imagenet = Preprocess(normalize="imagenet")(img)
    assert torch.allclose(imagenet[0, 112, 112], torch.tensor((1 - 0.485) / 0.229))
