"""launch/sample.py end to end: released-layout files in a temporary TORCH_HOME, offline."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from release_files import WRITERS

from rcdm.diffusion.gaussian import RELEASED
from rcdm.errors import UserError
from rcdm.model_files import parse_released_name
from rcdm.preprocess import center_crop
from rcdm.presets import build_unet
from rcdm.sampling import Sampling, draw

ROOT = Path(__file__).resolve().parents[1]


def run_sample(args: list[str], torch_home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"TORCH_HOME": str(torch_home)}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.fixture
def photo(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    arr = rng.integers(0, 255, (300, 450, 3), dtype=np.uint8)
    arr[100:200, 150:300] = (230, 30, 30)
    path = folder / "photo.jpg"
    Image.fromarray(arr).save(path, quality=95)
    return path


@pytest.mark.slow
def test_sample_from_a_released_checkpoint_offline(tmp_path, photo):
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_unet("adm128", 2048)
    for p in model.out.parameters():  # a non-zero output layer, so samples depend on the network
        torch.nn.init.normal_(p, std=0.01)
    torch.save(model.state_dict(), hub / "rcdm_ema_dino_trunk.pt")  # the release's plain state dict
    del model
    WRITERS["dino"](hub / "dino_resnet50_pretrain_full_checkpoint.pth", "resnet50")

    out = tmp_path / "grid.png"
    # one sample of 2 steps: each step is a 128 px forward of the 422 M-parameter UNet (seconds on a CPU)
    r = run_sample(["checkpoint=rcdm_ema_dino_trunk.pt", f"images={photo.parent.parent}", "num_samples=1",
                    "steps=2", "download=false", f"output={out}"], tmp_path / "torch", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (2 + 130, 2 + 2 * 130, 3)  # one row: original + 1 sample, 128 px, 2 px padding
    original = np.asarray(center_crop(Image.open(photo).convert("RGB"), 128))
    assert np.abs(grid[2:130, 2:130].astype(int) - original).max() <= 1  # first column: the input at 128 px
    assert grid[2:130, 132:260].std() > 1  # a sample, not a blank cell


def test_wrong_input_is_a_one_line_error(tmp_path, photo, typed, monkeypatch):
    from omegaconf.errors import MissingMandatoryValue

    from rcdm.sampling import sample_grid

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def fails(args: list[str]) -> str:
        with pytest.raises(UserError) as e:
            sample_grid(typed("sample", args + ["download=false"]))
        return str(e.value)

    (tmp_path / "empty").mkdir()
    assert "no images found" in fails(["checkpoint=rcdm_ema_dino_trunk.pt", f"images={tmp_path / 'empty'}"])
    assert "unknown encoder 'mocov3'" in fails(["checkpoint=rcdm_ema_mocov3_trunk.pt", f"images={photo}"])
    with pytest.raises(MissingMandatoryValue, match="checkpoint"):
        typed("sample", [f"images={photo}"])
    # a file named like a release that holds another architecture
    bad = tmp_path / "rcdm_ema_dino_trunk.pt"
    torch.save(build_unet("tiny", 2048).state_dict(), bad)
    assert "does not match the adm128 preset" in fails([f"checkpoint={bad}", f"images={photo}"])
    # the released file is not in the cache and downloads are off: name the URL and the path
    msg = fails(["checkpoint=rcdm_ema_vicreg_head.pt", f"images={photo}"])
    assert "https://dl.fbaipublicfiles.com/rcdm/rcdm_ema_vicreg_head.pt" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "rcdm_ema_vicreg_head.pt") in msg
    # the command prints one line, no traceback, and exits 2
    r = run_sample(["checkpoint=rcdm_ema_mocov3_trunk.pt", f"images={photo}", "download=false"], tmp_path / "torch",
                   tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        "error: " + fails(["checkpoint=rcdm_ema_mocov3_trunk.pt", f"images={photo}"])]


def test_released_names_give_encoder_and_level():
    assert parse_released_name("rcdm_ema_dino_trunk.pt") == ("dino", "backbone")
    assert parse_released_name("/x/rcdm_ema_simclr_head.pt") == ("simclr", "projector")
    assert parse_released_name("rcdm_ema_supervised.pt") == ("supervised", "backbone")
    with pytest.raises(UserError, match="rcdm_ema_<encoder>"):
        parse_released_name("model.pt")


def test_same_seed_same_samples():
    torch.manual_seed(0)
    model = build_unet("tiny", 8)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    cond = torch.randn(3, 8)
    how = Sampling("4", "ddpm", batch_size=2)
    a = draw(model, RELEASED, cond, how, torch.Generator().manual_seed(1))
    b = draw(model, RELEASED, cond, how, torch.Generator().manual_seed(1))
    c = draw(model, RELEASED, cond, how, torch.Generator().manual_seed(2))
    assert a.shape == (3, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
