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
    x = sample_fixed_noise(model, RELEASED, cond, steps, sampler, seed=0)
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
    analyze(["analysis=interpolate", f"images=[{folder / '0.png'},{folder / '1.png'}]", "points=5", "rows=2",
            *common])
    numbers = json.loads((tmp_path / "interpolate.json").read_text())
    assert numbers["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert numbers["path_cosine_to_a"][0] == pytest.approx(1) and numbers["path_cosine_to_b"][-1] == pytest.approx(1)
    assert Image.open(tmp_path / "interpolate.png").size == (2 + 7 * 34, 2 + 2 * 34)  # A, 5 points, B; 2 rows

    analyze(["analysis=variability", f"images={folder}", "samples=3", *common])
    numbers = json.loads((tmp_path / "variability.json").read_text())
    assert len(numbers["ratio"]) == 4 and all(x >= 0 for x in numbers["ratio"])
    assert Image.open(tmp_path / "variability.png").size == (2 + 5 * 34, 2 + 4 * 34)  # original, 3, heatmap

    analyze(["analysis=faithfulness", f"images={folder}", "boot=50", *common])
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


# --- manipulation, invariance, adversarial, fidelity: the pieces ------------------------------------------

def test_shared_dimensions_are_the_ones_the_neighbours_share():
    from rcdm.analysis.manipulate import edit, shared_dimensions, transfer_numbers

    g = torch.Generator().manual_seed(0)
    pool = torch.randn(200, 16, generator=g)
    pool[:10, 3] += 6.0  # ten images share a large value on dims 3 and 7, and sit close together
    pool[:10, 7] -= 6.0
    source = pool[0].clone()
    nn_idx, dims, values = shared_dimensions(pool, source, k=8, fraction=2 / 16)
    assert set(nn_idx.tolist()) <= set(range(1, 10))  # neighbours from the group, never the source itself
    assert set(dims.tolist()) == {3, 7}
    target = pool[150]
    edited = edit(target, dims, values)
    assert torch.equal(edited[[0, 1, 2, 4]], target[[0, 1, 2, 4]]) and torch.equal(edited[dims], values[dims])
    scale = pool.std(0)
    full = transfer_numbers(edited[None].repeat(4, 1), target[None].repeat(4, 1), dims, values, scale)
    none = transfer_numbers(target[None].repeat(4, 1), target[None].repeat(4, 1), dims, values, scale)
    assert full["transfer"] == pytest.approx(1.0) and none["transfer"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="more than k"):
        shared_dimensions(pool[:5], source, k=8, fraction=0.1)


def test_augmentation_families_do_what_they_say():
    from rcdm.analysis.invariance import FAMILIES, augment, embedding_invariance

    images, factors = synthetic_set(8, 3, "probe")
    x = images.float() / 255
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment("flip", x, g), x.flip(3))
    gray = augment("grayscale", x, g)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    for family in FAMILIES:
        v = augment(family, x, g)
        assert v.shape == x.shape and v.min() >= 0 and v.max() <= 1 and not torch.allclose(v, x)
    # zooming on the centre makes the object cover more of the image: fewer background pixels
    bg = lambda im: (im - im[:, :, :1, :1]).abs().sum(1).lt(0.05).float().mean()  # noqa: E731
    assert bg(augment("crop_scale", x, g)) < bg(x)
    h = {"backbone": torch.randn(8, 5, generator=g)}
    same = embedding_invariance(h, {"flip": {"backbone": h["backbone"].clone()}})
    assert same["flip"]["backbone"]["invariance_index"] == pytest.approx(1.0)
    other = embedding_invariance(h, {"flip": {"backbone": h["backbone"].roll(1, 0)}})
    assert other["flip"]["backbone"]["invariance_index"] < 0.5


def test_fgsm_flips_more_with_epsilon_and_stays_within_it():
    from rcdm.analysis.adversarial import attack, fgsm

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(3 * 8 * 8, 2)

        def embed(self, x):
            return x.flatten(1)

        def forward(self, x):
            return self.w(x.flatten(1))

    torch.manual_seed(0)
    model = Linear()
    x = torch.rand(64, 3, 8, 8) * 1.6 - 0.8
    y = model(x).argmax(1)
    xa = fgsm(model, x, y, 4.0)
    assert (xa - x).abs().max() <= 4.0 / 127.5 + 1e-6
    results, perturbed = attack({"ssl": model}, x, y, (0.0, 1.0, 8.0, 64.0))
    flips = results["ssl"]["flip_rate"]
    assert flips[0] == 0 and flips == sorted(flips) and flips[-1] > 0.5
    assert set(perturbed) == {0.0, 1.0, 8.0, 64.0}


def test_fidelity_metrics_on_a_small_feature_extractor():
    """FID, IS and precision/recall through torch-fidelity on features of a small network (no download)."""
    from rcdm.analysis.fidelity import extract, fidelity

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten())  # 32-d features
    head = torch.nn.Linear(32, 10)

    def extractor(images):
        with torch.no_grad():
            f = net(images)
            return {"features": f.double(), "logits": head(f).double() * 20}

    real = torch.rand(300, 3, 16, 16) * 2 - 1
    same = fidelity(extract(extractor, real), extract(extractor, real))
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["precision"] == 1.0 and same["recall"] == 1.0
    shifted = fidelity(extract(extractor, (real * 0.3 + 0.5).clamp(-1, 1)), extract(extractor, real))
    assert shifted["fid"] > 0.01 and shifted["recall"] < same["recall"]
    assert 1.0 <= same["inception_score"] <= 10.0


def test_inception_weights_missing_offline_name_the_file_and_cache(tmp_path, monkeypatch):
    from rcdm.analysis.fidelity import INCEPTION_URL, InceptionFeatures
    from rcdm.errors import UserError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError) as e:
        InceptionFeatures(torch.device("cpu"), download=False)
    assert INCEPTION_URL in str(e.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth") in str(e.value)


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
              "factor_steps=30"]

    analyze(["analysis=manipulate", f"checkpoint={run_root}", "images=synthetic:12", "neighbours=3",
             f"source={folder / '0.png'}", f"target={folder / '1.png'}", "samples=2", *common])
    numbers = json.loads((tmp_path / "manipulate.json").read_text())
    assert len(numbers["neighbours"]) == 3 and len(numbers["dims"]) == round(0.1 * numbers["embedding_dim"])
    assert math.isfinite(numbers["transfer"])
    assert Image.open(tmp_path / "manipulate.png").size == (2 + 3 * 34, 2 + 3 * 34)

    analyze(["analysis=invariance", f"checkpoint=[{backbone_run},{run_root}]", "images=synthetic:24",
                  "families=[grayscale,flip]", *common])
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

    analyze(["analysis=adversarial", f"checkpoint={run_root}", "images=synthetic:16", "task=background",
                  "epsilons=[0,2,16]", "probe_images=200", *common])
    numbers = json.loads((tmp_path / "adversarial.json").read_text())
    for model in ("supervised", "ssl"):
        res = numbers["models"][model]
        assert res["epsilon"] == [0, 2, 16] and res["flip_rate"][0] == 0 and res["embedding_drift"][0] == pytest.approx(0, abs=1e-6)
        assert res["flip_rate"][2] >= res["flip_rate"][0]
    assert (tmp_path / "adversarial_samples.png").exists()
    reads = numbers["samples"]  # the factor reader on samples from the perturbed embeddings, per epsilon
    assert reads["epsilon"] == [0, 2, 16] and all(0 <= v <= 1 for v in reads["samples_show_true"])

    analyze(["analysis=fidelity", f"checkpoint={run_root}", f"images={folder}", "features=encoder", *common])
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
            (["analysis=manipulate", f"checkpoint={run_root}", f"images={folder}"], "source=<image>"),
            (["analysis=invariance", f"checkpoint=[{run_root},{run_root}]", "images=synthetic:4"],
             "one checkpoint per level"),
            (["analysis=fidelity", f"checkpoint={run_root}", f"images={folder}", "features=vgg"],
             "choose inception or encoder")):
        with pytest.raises(UserError, match=message):
            analyze(args)


def test_factor_path_reads_a_then_b_along_the_path_and_wilson_intervals_bound_the_share():
    from rcdm.analysis.explore import factor_path
    from rcdm.analysis.invariance import wilson
    from rcdm.synthetic import SHAPES

    class Brightness(torch.nn.Module):  # a "factor reader": dark images are shape 0, bright ones shape 1
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            bright = (x.mean((1, 2, 3)) > 0).long()
            return {"shape": torch.nn.functional.one_hot(bright, len(SHAPES)).float()}

    fa = {"shape": SHAPES[0], "colour": "red", "background": "dark", "scale": 0.5, "x": 0.5, "y": 0.5,
          "grayscale": False}
    fb = {**fa, "shape": SHAPES[1]}
    grid = torch.cat([-torch.ones(2, 3, 3, 8, 8), torch.ones(2, 2, 3, 8, 8)], 1)  # 2 rows, 5 points: A A A B B
    out = factor_path(Brightness(), grid, fa, fb)
    assert out["differing"] == ["shape"]
    assert out["shows_a"] == [1, 1, 1, 0, 0] and out["shows_b"] == [0, 0, 0, 1, 1]
    for k, n in ((0, 10), (3, 10), (10, 10), (1, 2)):
        lo, hi = wilson(k, n)
        assert 0 <= lo <= k / n <= hi <= 1 and hi - lo > 0
    assert wilson(0, 10)[0] == 0 and wilson(10, 10)[1] == 1


def test_single_synthetic_images_by_name_carry_their_factors():
    from rcdm.analysis.commands import load_inputs

    pair = load_inputs(["synthetic/analysis/3", "synthetic/analysis/7"], 32)
    first8 = load_inputs("synthetic:8", 32)
    assert pair.names == ["synthetic/analysis/3", "synthetic/analysis/7"]
    assert pair.factors == [first8.factors[3], first8.factors[7]]
    with pytest.raises(UserError, match="mixes synthetic images and files"):
        load_inputs(["synthetic/analysis/3", "a.png"], 32)
