"""launch/demo_findings.py end to end on the shipped demo models, small: every part runs, findings.json holds each
finding's numbers with their intervals, findings.md its tables, and every figure the docs show is written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_findings_writes_every_table_and_figure(tmp_path):
    out = tmp_path / "findings"
    # one encoder, 4 images, 2 DDIM steps, 2 manipulation pairs, readers of 30 steps (cached under tmp_path)
    cmd = [sys.executable, "launch/demo_findings.py", f"output={out}", "encoders=[dino]", "images=4", "steps=ddim2",
           "guidance=[1.0,3.0]", "manipulate_pairs=2", "reader_steps=30", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "RCDM_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each part printed the launch/analyze.py command that reruns it alone, with the reader's steps
    commands = [ln for ln in proc.stdout.splitlines() if ln.startswith("python launch/analyze.py ")]
    assert any("analysis=adversarial" in c and "adversarial.reader_steps=30" in c for c in commands)
    assert not any("faithfulness.reader_steps" in c for c in commands)  # only analyses that read factors take it

    f = json.loads((out / "findings.json").read_text())
    assert f["encoders"] == ["dino"] and set(f["faithfulness"]) == {"dino-backbone", "dino-projector"}
    assert set(f["faithfulness"]["dino-backbone"]) == {"1.0", "3.0"}
    for level in ("backbone", "projector"):  # what the samples keep, beside the embedding's bound and chance
        shape = f["factor_reads"][f"dino-{level}"]["shape"]
        lo, hi = shape["samples_ci95"]
        assert lo <= shape["samples"] <= hi and 0 <= shape["bound"] <= 1 and shape["chance"] == 0.25
    s = f["invariance"]["dino"]["samples"]  # finding 2: shape kept while the view is followed, both levels
    assert "shape_and_follows_view" in s["backbone"]["grayscale"] and "grayscale" in s["projector"]
    manip = f["manipulation"]["dino"]
    assert set(manip) == {"neighbours", "colour", "shape"}
    assert manip["colour"]["pairs"] == 2 and -1 <= manip["colour"]["colour_transfer"] <= 1
    assert "shape_transfer_ci95" in manip["shape"]
    adv = f["adversarial"]["dino"]
    assert adv["task"] == "shape" and len(adv["models"]["ssl"]["flip_rate"]) == len(adv["samples"]["samples_show_true"])

    md = (out / "findings.md").read_text()
    for heading in ("**Faithfulness**", "**What the samples keep**", "**Invariance in samples**",
                    "**Interpolation**", "**Manipulation**", "**Adversarial**"):
        assert heading in md
    assert "| dino-backbone |" in md and "| dino-projector |" in md
    for name in ("samples", "faithfulness", "factor_reads", "invariance", "interpolation", "manipulation_neighbours",
                 "manipulation_colour", "manipulation_shape", "adversarial", "adversarial_samples"):
        assert Image.open(out / f"{name}.png").size[0] > 32, name
