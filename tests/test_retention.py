"""launch/retention.py: what each embedding level keeps (linear probe and k-NN vote with intervals, invariance per
augmentation, training cost), on the demo generator's factors or a folder's class labels."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rcdm.errors import UserError
from rcdm.retention import RetentionConfig, markdown, retention

ROOT = Path(__file__).resolve().parents[1]


def test_the_table_on_the_demo_generator_has_every_level_factor_and_interval():
    table = retention(RetentionConfig(encoders=["simclr"], train_images=96, test_images=48, invariance_images=16,
                                      bootstrap=50))
    e = table["encoders"]["simclr"]
    assert set(e["levels"]) == {"backbone", "projector"}
    for row in e["levels"].values():
        assert {"shape", "colour", "background", "scale", "x", "y", "grayscale"} <= set(row)
        for f, r in row.items():
            for est in (r["probe"], r["knn"]):
                assert 0 <= est["ci95"][0] <= est["value"] <= est["ci95"][1] <= 1 and est["n"] > 0
    assert e["levels"]["backbone"]["background"]["knn"]["value"] > 0.5  # the shipped encoder reads background
    for family, by_level in e["invariance"].items():
        for est in by_level.values():
            assert est["ci95"][0] <= est["value"] <= est["ci95"][1]
    assert e["training"]["steps"] >= 1000 and e["training"]["seconds"] > 0
    text = markdown(table)
    assert "| simclr | backbone |" in text and "colour_jitter" in text and "Chance:" in text


def test_a_folder_of_class_subfolders_is_probed_on_its_labels_and_one_without_is_refused(tmp_path):
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (40, 40), tuple(max(0, c - 5 * i) for c in colour)).save(tmp_path / "data" / label / f"{i}.png")
    table = retention(RetentionConfig(encoders=["vicreg"], images=str(tmp_path / "data"), train_images=16,
                                      test_images=8, invariance_images=0, k=3))
    row = table["encoders"]["vicreg"]["levels"]["backbone"]
    assert set(row) == {"label"} and row["label"]["knn"]["value"] == 1.0 and row["label"]["chance"] == 0.5
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(UserError, match="needs labels"):
        retention(RetentionConfig(encoders=["vicreg"], images=str(tmp_path / "flat")))


def test_the_command_writes_json_and_markdown(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "launch" / "retention.py"), "encoders=[dino]", "train_images=64",
                        "test_images=32", "invariance_images=8", "bootstrap=20", f"output={tmp_path / 'r.json'}",
                        f"markdown={tmp_path / 'r.md'}", f"hydra.run.dir={tmp_path / 'h'}"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "dino backbone: shape" in p.stdout
    assert json.loads((tmp_path / "r.json").read_text())["encoders"]["dino"]["levels"]
    assert "| dino | projector |" in (tmp_path / "r.md").read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "launch" / "retention.py"), "train_images=0",
                          f"hydra.run.dir={tmp_path / 'h2'}"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: train_images=0")
