"""The paper's analyses: faithfulness (rank of a sample's own conditioning among all samples),
interpolation, variability, and the launch/analyze.py command that writes their figures and numbers."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from rcdm.analysis.explore import embedding_path, sample_fixed_noise, variability
from rcdm.analysis.faithfulness import chance_levels, faithfulness, ranks, summarise
from rcdm.encoders import build_encoder
from rcdm.presets import build_unet
from rcdm.probes import synthetic_set

ROOT = Path(__file__).resolve().parents[1]


def test_ranks_perfect_collapsed_and_deranged():
    h = torch.randn(10, 16)
    assert ranks(h, h).tolist() == [1] * 10
    assert ranks(h, 3 * h).tolist() == [1] * 10  # cosine: scale does not matter
    # a model that draws the same image for every embedding: ties count against it, rank N for all
    assert ranks(h, h[:1].repeat(10, 1)).tolist() == [10] * 10
    # every sample carries another image's embedding: the own sample is never first
    assert (ranks(h, h.roll(1, 0)) > 1).all()


def test_summary_and_chance_levels():
    s = summarise(torch.ones(20, dtype=torch.long))
    assert (s["mrr"], s["top1"], s["mean_rank"], s["median_rank"]) == (1.0, 1.0, 1.0, 1.0)
    assert s["mrr_ci95"] == [1.0, 1.0]
    n = 40
    c = chance_levels(n)
    assert c["top1"] == 1 / n and c["mean_rank"] == (n + 1) / 2
    assert c["mrr"] == pytest.approx(sum(1 / k for k in range(1, n + 1)) / n)
    # embeddings with no relation to their samples score at chance on average
    gen = torch.Generator().manual_seed(0)
    mrr = [summarise(ranks(torch.randn(n, 8, generator=gen), torch.randn(n, 8, generator=gen)), boot=10)["mrr"]
           for _ in range(300)]
    assert sum(mrr) / len(mrr) == pytest.approx(c["mrr"], abs=0.01)
    r = torch.randint(1, n + 1, (n,), generator=gen)
    s = summarise(r, boot=500)
    assert s["mrr_ci95"][0] <= s["mrr"] <= s["mrr_ci95"][1]
    assert s["mean_rank_ci95"][0] <= s["mean_rank"] <= s["mean_rank_ci95"][1]


def test_a_perfect_generator_is_ranked_first_through_the_encoders_own_preprocessing():
    """Samples that are the conditioning images themselves, re-encoded via PIL and the encoder's preprocess."""
    enc = build_encoder("vicreg", "tiny", "random")
    images, _ = synthetic_set(12, 3, "probe")
    with torch.no_grad():
        h = enc(enc.preprocess.normalize_uint8(images))["projector"]
    out = faithfulness(h, images.float() / 127.5 - 1, enc, "projector", boot=100)
    assert out["top1"] == 1.0 and out["mrr"] == 1.0 and out["cosine_own"] == pytest.approx(1.0, abs=1e-4)
    assert out["chance"]["mrr"] == pytest.approx(sum(1 / k for k in range(1, 13)) / 12)
    noise = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert faithfulness(h, noise, enc, "projector", boot=100)["top1"] < 0.5
    assert not math.isnan(out["mean_rank_ci95"][0])


# --- interpolation and variability -----------------------------------------------------------------

def test_embedding_paths_start_and_end_at_the_two_embeddings():
    h0, h1 = torch.randn(32), 3 * torch.randn(32)
    a = torch.linspace(0, 1, 5)
    for mode in ("linear", "spherical"):
        p = embedding_path(h0, h1, a, mode)
        assert torch.allclose(p[0], h0, atol=1e-5) and torch.allclose(p[-1], h1, atol=1e-5)
    mid = embedding_path(h0, h1, torch.tensor([0.5]), "spherical")[0]
    assert mid.norm() == pytest.approx(((h0.norm() + h1.norm()) / 2).item(), rel=1e-5)  # norms interpolate
    cos = torch.nn.functional.cosine_similarity
    assert cos(mid, h0, 0) == pytest.approx(cos(mid, h1, 0).item(), abs=1e-5)  # the direction halfway
    with pytest.raises(ValueError, match="linear or spherical"):
        embedding_path(h0, h1, a, "cubic")


@pytest.mark.parametrize("sampler,steps", [("ddim", "ddim4"), ("ddpm", "4")])
def test_fixed_noise_along_the_path(sampler, steps):
    """Equal conditioning rows give equal samples (the noise is the same for every path point), and
    different conditioning gives different samples."""
    torch.manual_seed(0)
    model = build_unet("tiny", 8).eval()
    with torch.no_grad():  # ADM zero-initialises output layers: give the conditioning a say
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cond = torch.randn(3, 8)
    cond[2] = cond[0]
    x = sample_fixed_noise(model, "linear", 1000, cond, steps, sampler, seed=0)
    assert torch.equal(x[0], x[2]) and not torch.equal(x[0], x[1])


def test_variability_ratio_bounds():
    base = torch.rand(4, 1, 3, 8, 8) * 2 - 1
    fixed = variability(base.expand(4, 6, 3, 8, 8))
    assert fixed["ratio_mean"] == 0.0  # the embedding fixes the image
    iid = variability(torch.rand(40, 40, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert iid["ratio_mean"] == pytest.approx(1.0, abs=0.05)  # samples vary as much as different images
    with pytest.raises(ValueError):
        variability(torch.zeros(1, 4, 3, 8, 8))


# --- the commands on a trained demo model ------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny RCDM trained a few steps on a small synthetic dataset, and a folder of 4 held-out images."""
    from test_training import compose_sweep, make_dataset

    from rcdm.hydra_support import train_config
    from rcdm.train import train

    d = tmp_path_factory.mktemp("analysis")
    url = make_dataset(d / "ds", train=32, val=4, encoders=("vicreg",))
    cfg = compose_sweep(["data=shards", f"data.url={url}", "encoder=vicreg", "level=projector", "train.steps=2",
                         "train.batch_size=4", "train.loader_workers=0", "grid.images=1", "grid.samples=1",
                         "grid.steps=ddim2", "faithfulness.images=4", "faithfulness.steps=ddim2",
                         f"storage.run_root={d / 'runs'}", f"tracking.uri=sqlite:///{d / 'm.db'}"])
    train(train_config(cfg))
    folder = d / "images"
    folder.mkdir()
    images, _ = synthetic_set(4, 11, "probe")
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    run_root = d / "runs" / "rcdm-demo" / "main" / "vicreg-projector-tiny"
    run_id = json.loads((run_root / "mlflow_run.json").read_text())["run_id"]
    return run_root, folder, run_id, f"sqlite:///{d / 'm.db'}"


def _analyze(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "analyze.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_analysis_commands_write_figures_and_numbers(trained, tmp_path):
    run_root, folder, run_id, uri = trained
    common = [f"checkpoint={run_root}", "steps=ddim3", f"output={tmp_path}", f"mlflow_run_id={run_id}",
              f"tracking_uri={uri}"]
    r = _analyze(["analysis=interpolate", f"images=[{folder / '0.png'},{folder / '1.png'}]", "points=5", "rows=2",
                  *common], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    numbers = json.loads((tmp_path / "interpolate.json").read_text())
    assert numbers["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert numbers["path_cosine_to_a"][0] == pytest.approx(1) and numbers["path_cosine_to_b"][-1] == pytest.approx(1)
    assert Image.open(tmp_path / "interpolate.png").size == (2 + 7 * 34, 2 + 2 * 34)  # A, 5 points, B; 2 rows

    r = _analyze(["analysis=variability", f"images={folder}", "samples=3", *common], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    numbers = json.loads((tmp_path / "variability.json").read_text())
    assert len(numbers["ratio"]) == 4 and all(x >= 0 for x in numbers["ratio"])
    assert Image.open(tmp_path / "variability.png").size == (2 + 5 * 34, 2 + 4 * 34)  # original, 3, heatmap

    r = _analyze(["analysis=faithfulness", f"images={folder}", "boot=50", *common], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    numbers = json.loads((tmp_path / "faithfulness.json").read_text())
    assert {"chance", "mean_rank", "median_rank", "mrr", "mrr_ci95", "ranks", "top1"} <= set(numbers)
    assert len(numbers["ranks"]) == 4 and all(1 <= x <= 4 for x in numbers["ranks"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(run_id, "analysis")}
    assert logged == {f"analysis/{n}.{e}" for n in ("interpolate", "variability", "faithfulness") for e in ("png", "json")}
    assert "variability_ratio_mean" in client.get_run(run_id).data.metrics
    # the run's own end-of-training faithfulness is there too, as an artifact and as metrics
    assert "faithfulness.json" in {a.path for a in client.list_artifacts(run_id)}
    assert client.get_run(run_id).data.metrics["faithfulness_mrr_chance"] == pytest.approx((1 + 1/2 + 1/3 + 1/4) / 4)


def test_analysis_input_errors_name_the_fix(trained, tmp_path):
    run_root, folder, _, _ = trained
    r = _analyze(["analysis=interpolate", f"checkpoint={run_root}", f"images={folder}"], tmp_path)
    assert r.returncode == 2 and "exactly 2 images" in r.stderr
    r = _analyze(["analysis=colour", f"checkpoint={run_root}", f"images={folder}"], tmp_path)
    assert r.returncode == 2 and "choose one of interpolate" in r.stderr
    r = _analyze(["analysis=variability", f"images={folder}"], tmp_path)
    assert r.returncode == 2 and "checkpoint is required" in r.stderr
