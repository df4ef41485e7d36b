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

from rcdm.analysis.interpolate import embedding_path, sample_fixed_noise
from rcdm.sampling import Sampling
from rcdm.analysis.variability import variability
from rcdm.analysis.faithfulness import chance_levels, faithfulness, ranks, summarise
from rcdm.diffusion.gaussian import RELEASED
from rcdm.encoders import build_encoder
from rcdm.errors import UserError
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
    x = sample_fixed_noise(model, RELEASED, cond, Sampling(steps, sampler), seed=0)
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

def _train_vicreg(typed, d: Path, level: str, extra: list[str]) -> Path:
    """Two training steps of a tiny VICReg RCDM at ``level`` on the dataset in d/ds -> its run root."""
    from rcdm.train import train

    cfg = typed("sweep", ["data=shards", f"data.url={d / 'ds'}", "encoder=vicreg", f"level={level}", "train.steps=2",
                         "train.batch_size=4", "train.loader_workers=0", "grid.images=1", "grid.samples=1",
                         "grid.steps=ddim2", *extra, f"storage.run_root={d / 'runs'}",
                         f"tracking.uri=sqlite:///{d / 'm.db'}"])
    train(cfg)
    return d / "runs" / "rcdm-demo" / "main" / f"vicreg-{level}-tiny"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_dataset, typed):
    """A tiny RCDM trained a few steps on a small synthetic dataset, and a folder of 4 held-out images."""
    d = tmp_path_factory.mktemp("analysis")
    make_dataset(d / "ds", train=32, val=4, encoders=("vicreg",))
    run_root = _train_vicreg(typed, d, "projector", ["faithfulness.images=4", "faithfulness.steps=ddim2"])
    folder = d / "images"
    folder.mkdir()
    images, _ = synthetic_set(4, 11, "probe")
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    run_id = json.loads((run_root / "mlflow_run.json").read_text())["run_id"]
    return run_root, folder, run_id, f"sqlite:///{d / 'm.db'}"


@pytest.fixture
def analyze(typed):
    """launch/analyze.py's work, in this process: overrides -> run_analysis's summary."""
    from rcdm.analysis.commands import run_analysis

    return lambda args: run_analysis(typed("analyze", args))


@pytest.mark.slow
def test_analysis_commands_write_figures_and_numbers(trained, tmp_path, analyze):
    run_root, folder, run_id, uri = trained
    common = [f"checkpoint={run_root}", "steps=ddim3", f"output={tmp_path}", f"mlflow_run_id={run_id}",
              f"tracking_uri={uri}"]
    analyze(["analysis=interpolate", f"images=[{folder / '0.png'},{folder / '1.png'}]", "interpolate.points=5", "interpolate.rows=2",
            *common])
    numbers = json.loads((tmp_path / "interpolate.json").read_text())
    assert numbers["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert numbers["path_cosine_to_a"][0] == pytest.approx(1) and numbers["path_cosine_to_b"][-1] == pytest.approx(1)
    assert Image.open(tmp_path / "interpolate.png").size == (2 + 7 * 34, 2 + 2 * 34)  # A, 5 points, B; 2 rows

    analyze(["analysis=variability", f"images={folder}", "variability.samples=3", *common])
    numbers = json.loads((tmp_path / "variability.json").read_text())
    assert len(numbers["ratio"]) == 4 and all(x >= 0 for x in numbers["ratio"])
    assert Image.open(tmp_path / "variability.png").size == (2 + 5 * 34, 2 + 4 * 34)  # original, 3, heatmap

    analyze(["analysis=faithfulness", f"images={folder}", "faithfulness.boot=50", *common])
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


def test_analysis_input_errors_name_the_fix(trained, tmp_path, analyze):
    run_root, folder, _, _ = trained
    with pytest.raises(UserError, match="exactly 2 images"):
        analyze(["analysis=interpolate", f"checkpoint={run_root}", f"images={folder}"])
    with pytest.raises(UserError, match="choose one of interpolate"):
        analyze(["analysis=colour", f"checkpoint={run_root}", f"images={folder}"])
    # the launcher turns both kinds of bad input into one line and exit status 2
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "analyze.py"), "analysis=variability",
                        f"images={folder}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "error: checkpoint is required: add checkpoint=... to the command"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "analyze.py"), "analysis=colour",
                        f"checkpoint={run_root}", f"images={folder}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown analysis 'colour'")


# --- the new commands on the trained demo models ---------------------------------------------------------

@pytest.fixture(scope="module")
def backbone_run(trained, typed):
    """The same encoder's backbone-level RCDM (invariance compares levels)."""
    return _train_vicreg(typed, trained[0].parents[3], "backbone", ["faithfulness.images=0"])


@pytest.mark.slow
def test_finding_commands_write_figures_and_numbers(trained, backbone_run, tmp_path, monkeypatch, analyze):
    run_root, folder, run_id, uri = trained
    monkeypatch.setenv("RCDM_CACHE", str(tmp_path / "cache"))
    common = ["steps=ddim2", f"output={tmp_path}", f"mlflow_run_id={run_id}", f"tracking_uri={uri}",
              "interpolate.reader_steps=30", "invariance.reader_steps=30", "adversarial.reader_steps=30"]

    analyze(["analysis=manipulate", f"checkpoint={run_root}", "images=synthetic:12", "manipulate.neighbours=3",
             f"manipulate.source={folder / '0.png'}", f"manipulate.target={folder / '1.png'}", "manipulate.samples=2", *common])
    numbers = json.loads((tmp_path / "manipulate.json").read_text())
    assert len(numbers["neighbours"]) == 3 and len(numbers["dims"]) == round(0.1 * numbers["embedding_dim"])
    assert math.isfinite(numbers["transfer"])
    assert Image.open(tmp_path / "manipulate.png").size == (2 + 3 * 34, 2 + 3 * 34)
    # one named factor edited along its mean difference, read by the factor reader (finding 4's colour edit)
    pair = ["manipulate.source=synthetic/analysis/0", "manipulate.target=synthetic/analysis/2"]  # differ in colour
    analyze(["analysis=manipulate", f"checkpoint={run_root}", "images=synthetic:48", "manipulate.attribute=colour",
             "manipulate.samples=2", "manipulate.reader_steps=30", *pair, *common])
    numbers = json.loads((tmp_path / "manipulate.json").read_text())
    assert numbers["attribute"] == "colour" and numbers["source_value"] != numbers["target_value"]
    assert numbers["transfer"] == numbers["factor_transfer"]["colour"]["transfer"] and -1 <= numbers["transfer"] <= 1
    assert numbers["group_size"] >= 2 and math.isfinite(numbers["embedding_along_edit"])

    analyze(["analysis=invariance", f"checkpoint=[{backbone_run},{run_root}]", "images=synthetic:24",
                  "invariance.families=[grayscale,flip]", *common])
    numbers = json.loads((tmp_path / "invariance.json").read_text())
    emb = numbers["embedding"]["grayscale"]
    # finding 2 with the shipped SSL-trained VICReg: the projector is more invariant to grayscale
    assert emb["projector"]["invariance_index"] > emb["backbone"]["invariance_index"]
    for level in ("backbone", "projector"):
        table = numbers["samples"][level]
        assert set(table) == {"clean", "clean_ci95", "grayscale", "flip"}
        assert all(0 <= v <= 1 for v in table["grayscale"]["preserved"].values() if v is not None)
        for k, v in table["grayscale"]["preserved"].items():  # each share inside its Wilson interval
            lo, hi = table["grayscale"]["preserved_ci95"][k]
            assert 0 <= lo <= v <= hi <= 1
    assert Image.open(tmp_path / "invariance.png").size == (2 + 4 * 34, 2 + 6 * 34)  # 3 images x 2 families

    analyze(["analysis=adversarial", f"checkpoint={run_root}", "images=synthetic:16", "adversarial.task=background",
                  "adversarial.epsilons=[0,2,16]", "adversarial.probe_images=200", *common])
    numbers = json.loads((tmp_path / "adversarial.json").read_text())
    for model in ("supervised", "ssl"):
        res = numbers["models"][model]
        assert res["epsilon"] == [0, 2, 16] and res["flip_rate"][0] == 0 and res["embedding_drift"][0] == pytest.approx(0, abs=1e-6)
        assert res["flip_rate"][2] >= res["flip_rate"][0]
    assert (tmp_path / "adversarial_samples.png").exists()
    reads = numbers["samples"]  # the factor reader on samples from the perturbed embeddings, per epsilon
    assert reads["epsilon"] == [0, 2, 16] and all(0 <= v <= 1 for v in reads["samples_show_true"])

    analyze(["analysis=fidelity", f"checkpoint={run_root}", f"images={folder}", "fidelity.features=encoder", *common])
    numbers = json.loads((tmp_path / "fidelity.json").read_text())
    assert numbers["fid"] >= 0 and numbers["inception_score"] is None and numbers["samples"] == 4

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="weights-inception-2015-12-05-6726825d.pth"):
        analyze(["analysis=fidelity", f"checkpoint={run_root}", f"images={folder}", "download=false"])

    from mlflow.tracking import MlflowClient

    logged = {a.path for a in MlflowClient(uri).list_artifacts(run_id, "analysis")}
    assert {"analysis/manipulate.png", "analysis/invariance.json", "analysis/adversarial_samples.png",
            "analysis/fidelity.json"} <= logged


def test_finding_command_input_errors_name_the_fix(trained, analyze):
    run_root, folder, _, _ = trained
    for args, message in (
            (["analysis=adversarial", f"checkpoint={run_root}", f"images={folder}"], "images=synthetic:N"),
            (["analysis=manipulate", f"checkpoint={run_root}", f"images={folder}"], "manipulate.source=<image>"),
            (["analysis=manipulate", f"checkpoint={run_root}", "images=synthetic:8", "manipulate.attribute=size",
              "manipulate.source=synthetic/analysis/0", "manipulate.target=synthetic/analysis/2"],
             "manipulate.attribute=size is not a factor"),
            (["analysis=manipulate", f"checkpoint={run_root}", f"images={folder}", "manipulate.attribute=colour",
              "manipulate.source=synthetic/analysis/0", "manipulate.target=synthetic/analysis/2"], "images=synthetic:N"),
            (["analysis=invariance", f"checkpoint=[{run_root},{run_root}]", "images=synthetic:4"],
             "one checkpoint per level"),
            (["analysis=fidelity", f"checkpoint={run_root}", f"images={folder}", "fidelity.features=vgg"],
             "choose inception or encoder")):
        with pytest.raises(UserError, match=message):
            analyze(args)
