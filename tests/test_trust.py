"""Nothing rcdm loads can run code: every torch.load is weights_only, a file that would need more is
refused with a one-line error saying what it holds, and the payload never runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from release_files import WRITERS

from rcdm import train_checkpoints
from rcdm.encoders.weights import load_file
from rcdm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious(path: Path, marker: Path, **extra) -> Path:
    torch.save({"model": {"w": torch.zeros(2)}, "payload": RunsCode(marker), **extra}, path)
    return path


def test_weights_that_would_run_code_are_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = _malicious(tmp_path / "weights.pth", marker)
    with pytest.raises(UserError, match=r"holds posix\.system, which rcdm does not unpickle") as e:
        load_file(path)
    assert "\n" not in str(e.value) and not marker.exists()


def test_a_training_checkpoint_that_would_run_code_is_refused_by_sample_py(tmp_path):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _malicious(run / "checkpoints" / "ckpt-000000010.pt", marker, format="rcdm", step=10)
    (run / "checkpoints" / "latest.json").write_text('{"file": "ckpt-000000010.pt", "step": 10, "history": []}')
    with pytest.raises(UserError, match="posix.system"):
        train_checkpoints.load(train_checkpoints.latest_path(str(run)))
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), f"checkpoint={run}",
                        f"images={tmp_path / 'a.png'}", "device=cpu", "download=false"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "holds posix.system, which rcdm does not unpickle" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not marker.exists()


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_released_layout_loads_without_unpickling(tmp_path, name):
    """The fakes carry what the releases carry (DINO's argparse.Namespace, VISSL's nesting): all allowed by
    name, nothing else."""
    path = tmp_path / f"{name}.pth"
    WRITERS[name](path, "tiny")
    state = load_file(path)
    assert isinstance(state, dict) and state
