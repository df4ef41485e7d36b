"""Experiments carry whole budgets and levels none; every sweep command the docs show composes to its
experiment's budget, and launch/plan.py prints a sweep's cost without submitting anything (issue 27)."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline import schemas

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
IMAGENET = [e for e in EXPERIMENTS if e != "demo"]


def composed(overrides):
    schemas.register()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("sweep", overrides=overrides)


def test_the_experiments_are_there_and_levels_carry_no_budget():
    assert {"demo", "imagenet64_resnet50", "imagenet128_resnet50", "imagenet_dinov2"} <= set(EXPERIMENTS)
    for level in (ROOT / "configs" / "level").glob("*.yaml"):
        assert "train" not in OmegaConf.load(level), f"{level.name} sets a budget; budgets belong to experiments"


def test_the_demo_keeps_its_per_level_budget():
    for level, steps in (("backbone", 480), ("projector", 120)):
        c = composed([f"level={level}"])
        assert (c.train.steps, c.train.checkpoint_every, c.model.name, c.tracking.experiment) == (
            steps, 80, "tiny", "rcdm-demo")
        # every job starts from a shipped decoder, on whitened embeddings (configs/start/demo_tiny_vpred.yaml)
        assert (c.train.init_from, c.train.init_parts, c.recipe.whiten_embeddings) == (
            "demo:dino-backbone", "decoder", True)
    for other in ("recipe=adm", "model=adm128"):  # a decoder the shipped one is not: from scratch
        c = composed(["level=backbone", other])
        assert (c.train.init_from, c.train.init_parts, c.recipe.whiten_embeddings) == (None, "all", False), other
    assert composed(["level=projector", "train.steps=7"]).train.steps == 7  # the command line wins


def test_the_dinov2_experiment_extends_the_papers_setting_changing_only_its_encoder():
    """imagenet_dinov2 includes imagenet128_resnet50 instead of copying it: what differs is the encoder and where it
    logs, nothing else (a budget changed in one holds in both)."""
    def flat(c, prefix=""):
        out = {}
        for k, v in c.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = (flat(OmegaConf.to_container(composed([f"experiment={e}", "level=backbone"]), resolve=False))
            for e in ("imagenet128_resnet50", "imagenet_dinov2"))
    differ = {k.split(".")[0] for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert differ == {"encoder", "tracking"}, differ
    assert "train:" not in (ROOT / "configs" / "experiment" / "imagenet_dinov2.yaml").read_text()


@pytest.mark.parametrize("experiment", IMAGENET)
@pytest.mark.parametrize("level", ["backbone", "projector"])
def test_imagenet_experiments_set_a_real_budget_at_every_level(experiment, level):
    c = composed([f"experiment={experiment}", f"level={level}", "data.url=s3://bucket/x"])
    assert c.train.steps >= 100_000 and c.train.checkpoint_every >= 1000 and c.train.sample_every >= 1000
    assert c.train.loader_workers >= 4 and c.train.batch_size >= 256 and c.recipe.name == "adm"
    assert c.model.name in ("adm64", "adm128") and c.data.build_if_missing is False
    assert c.faithfulness.images >= 256 and c.cluster.nodes * c.cluster.tasks_per_node >= 8
    assert c.tracking.experiment != "rcdm-demo"


def doc_commands(path: Path, script: str) -> list[list[str]]:
    """The override lists of every ``python <script>`` command in the page's code blocks (continuations
    joined, comments dropped, sweeps reduced to their first value)."""
    text = path.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith(f"python {script}"):
                args = [a for a in shlex.split(line)[2:] if a not in ("-m", "--multirun")]
                out.append([re.sub(r"=([^,\[]+),.*$", r"=\1", a) for a in args])
    return out


def test_every_cluster_sweep_in_the_docs_composes_to_its_experiments_budget():
    commands = [c for page in (ROOT / "README.md", ROOT / "docs" / "cluster.md", ROOT / "docs" / "training.md")
                for c in doc_commands(page, "launch/sweep.py")]
    slurm = [c for c in commands if "cluster=slurm" in c and "data.url=s3://rcdm/demo" not in c]
    assert slurm, "the docs show no cluster sweep"
    for overrides in slurm:
        c = composed(overrides)
        exp = next((a.split("=", 1)[1] for a in overrides if a.startswith("experiment=")), None)
        assert exp in IMAGENET, f"a cluster sweep without an ImageNet experiment: {overrides}"
        given = next((int(a.split("=", 1)[1]) for a in overrides if a.startswith("train.steps=")), None)
        budget = OmegaConf.load(ROOT / "configs" / "experiment" / f"{exp}.yaml").train.steps
        assert c.train.steps == (budget if given is None else given), overrides  # the command line wins


def run_plan(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "plan.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_plan_of_the_demo_sweep_prints_each_job_and_submits_nothing(tmp_path):
    """The README's first command, as written there: 8 jobs at the demo's budget (the sweep test in
    tests/test_training.py trains two of its encoders end to end)."""
    line = next(ln for ln in (ROOT / "README.md").read_text().splitlines()
                if ln.startswith('pip install -e ".[test]" && python launch/sweep.py'))
    r = run_plan(shlex.split(line.split("launch/sweep.py", 1)[1]), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(("vicreg-", "dino-", "barlow-", "simclr-"))]
    assert sorted(row[0] for row in rows) == sorted(f"{e}-{lv}-tiny" for e in ("vicreg", "dino", "barlow", "simclr")
                                                    for lv in ("backbone", "projector"))
    for row in rows:
        steps = 480 if "backbone" in row[0] else 120
        assert (row[3], row[4], row[5]) == (str(steps), "32", f"{steps * 32:,}")
    assert "CPU hours, measured here" in r.stdout and "nothing was submitted" in r.stdout
    assert not any(tmp_path.iterdir())  # no data built, no run folder, no MLflow store


@pytest.mark.slow
def test_plan_of_an_imagenet_sweep_reads_the_manifest_and_the_measured_step(tmp_path, monkeypatch):
    from rcdm import cost
    from sharding.config import ShardJob, SyntheticInput
    from sharding.orchestrate import shard

    data = tmp_path / "imagenet"
    shard(ShardJob(input="synthetic", output=str(data), synthetic=SyntheticInput(8), image_size=32, shard_size=4,
                   encoders=["vicreg"], loader_workers=0))
    args = ["experiment=imagenet128_resnet50", "encoder=vicreg", "level=backbone,projector", f"data.url={data}",
            "cluster=slurm", "plan.device=H200"]
    r = run_plan(args, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "estimate: " in r.stdout and "989 TFLOP/s" in r.stdout
    row = next(ln.split() for ln in r.stdout.splitlines() if ln.startswith("vicreg-backbone-adm128"))
    assert row[1:6] == ["2", "16", "300,000", "256", "76,800,000"]
    size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) / 1e9
    assert f"dataset {data}: {size:,.2f} GB" in r.stdout

    # with a measured step for the device, the plan uses it and says so
    results = tmp_path / "gpu_step.json"
    results.write_text(json.dumps({"reduced": False, "device": "cuda: NVIDIA H200 x 1 rank",
                                   "machine": {"gpu": "NVIDIA H200"},
                                   "presets": {"adm128": {"rcdm": {"step_s": 0.5, "batch": 32}}}}))
    monkeypatch.setattr(cost, "RESULTS", results)
    from rcdm.config import TrainConfig

    cfg = OmegaConf.to_object(composed(args[:2] + ["level=backbone", f"data.url={data}", "cluster=slurm"]))
    assert isinstance(cfg, TrainConfig)
    job = cost.plan_job(cfg, 128, "H200", 0.35)
    assert job.hours_source.startswith("measured: 0.500 s/step at batch 32 on NVIDIA H200")
    assert job.device_hours == pytest.approx(300_000 * 0.5 * (256 / 16) / 32 * 16 / 3600)


@pytest.mark.slow
def test_the_warm_experiment_starts_any_encoders_job_from_the_released_decoder(tmp_path, monkeypatch):
    """experiment=imagenet128_warm: launch/fetch_weights.py lists the released RCDM it starts from, and a job of
    another encoder (DINOv2's 768-d CLS token) takes every weight of a file in the release's layout (an adm128 state
    dict conditioned on 2048-d ResNet-50 embeddings) but the conditioning input, which starts at zero."""
    from types import SimpleNamespace

    import torch

    from pipeline.weights_needed import needed
    from rcdm.presets import build_unet, preset_config
    from rcdm.warm_start import CONDITIONING, warm_start

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = OmegaConf.to_object(composed(["experiment=imagenet128_warm", "encoder=dinov2_vitb14", "level=backbone",
                                        f"data.url={tmp_path / 'not-sharded-yet'}"]))
    assert (cfg.train.steps, cfg.model.name, cfg.recipe.name) == (100_000, "adm128", "adm")
    files = [f for f in needed(cfg)[0] if f.what.startswith("init_from")]
    assert [f.url for f in files] == ["https://dl.fbaipublicfiles.com/rcdm/rcdm_ema_dino_trunk.pt"]

    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_unet("adm128", 2048).state_dict(), hub / "rcdm_ema_dino_trunk.pt")
    unet_cfg = preset_config("adm128", 768, **cfg.recipe.unet_options())
    model, ema = build_unet("adm128", 768), build_unet("adm128", 768)
    info = SimpleNamespace(encoder_record=SimpleNamespace(weights=SimpleNamespace(sha256=None)))
    record = warm_start(cfg.train.init_from, cfg, info, unet_cfg, model, ema)
    assert record.parts == "decoder" and record.source_encoder == "dino backbone"
    source = torch.load(hub / "rcdm_ema_dino_trunk.pt", weights_only=True)
    for name, w in model.state_dict().items():
        if name == "ssl_emb.weight":
            assert w.shape == (source[name].shape[0], 768) and not w.any()
        elif not name.startswith(CONDITIONING):
            assert torch.equal(w, source[name]), name
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.state_dict().values()))
