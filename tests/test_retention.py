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


def test_shipping_pretrained_encoders_keeps_the_replaced_ones_for_what_was_made_with_them(tmp_path, monkeypatch,
                                                                                            typed):
    """ship_from swaps a pretrained tiny encoder into rcdm with its retention numbers and goals in its record; the
    file it replaces moves to the earlier folder, where a record of its sha256 still finds it; a staged file that
    is not the one its record names is refused before anything moves."""
    import shutil

    from rcdm.encoders import build_encoder, zoo
    from rcdm.encoders.weights import WeightsRecord, sha256sum
    from rcdm.retention import ship_tiny
    from rcdm.ssl.pretrain import pretrain

    shipped = tmp_path / "tiny_weights"
    shipped.mkdir()
    for ext in ("pt", "json"):
        shutil.copy(zoo.TINY_WEIGHTS / f"simclr.{ext}", shipped / f"simclr.{ext}")
    monkeypatch.setattr(zoo, "TINY_WEIGHTS", shipped)
    monkeypatch.setitem(zoo.EARLIER_TINY, "v0", "the test's earlier encoders")
    old = sha256sum(shipped / "simclr.pt")
    staged = tmp_path / "staged"
    new = pretrain(typed("pretrain_encoder", ["method=simclr", f"output={staged / 'simclr.pt'}", "steps=2",
                                              "batch_size=8", "images=16", "warmup_steps=1", "tracking.uri=null"]))
    cfg = RetentionConfig(encoders=["simclr"], train_images=64, test_images=32, invariance_images=8, bootstrap=20,
                          ship_from=str(staged), ship_earlier="v0")
    with pytest.raises(UserError, match="EARLIER_TINY does not name"):
        ship_tiny(RetentionConfig(encoders=["simclr"], ship_from=str(staged), ship_earlier="v9"))
    good = (staged / "simclr.pt").read_bytes()
    (staged / "simclr.pt").write_bytes(good[:-4] + b"XXXX")
    with pytest.raises(UserError, match="does not match the sha256"):
        ship_tiny(cfg)
    assert sha256sum(shipped / "simclr.pt") == old and not (shipped / "v0").exists()  # nothing moved
    (staged / "simclr.pt").write_bytes(good)
    table = ship_tiny(cfg)
    record = json.loads((shipped / "simclr.json").read_text())
    assert record["sha256"] == new["sha256"] == sha256sum(shipped / "simclr.pt")
    assert {g["level"] + " " + g["factor"] for g in record["retention"]["goals"]} == {
        "backbone shape", "backbone colour", "projector shape", "projector colour"}
    assert all(isinstance(g["knn"]["met"], bool) and g["probe"]["ci95"][0] <= g["probe"]["value"]
               for g in record["retention"]["goals"])
    assert table["encoders"]["simclr"]["training"]["sha256"] == new["sha256"]
    assert build_encoder("simclr", "tiny").weights.sha256 == new["sha256"]  # the current one
    assert build_encoder("simclr", "tiny", WeightsRecord("released", old)).weights.sha256 == old  # from v0/
    assert sha256sum(shipped / "v0" / "simclr.pt") == old
