"""The training service: configs compose and run, DDP equals one process, preemption resumes, MLflow."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from pipeline.stages import ensure_demo_data, train_config
from rcdm import train_checkpoints
from rcdm.config import TrainConfig
from rcdm.diffusion.gaussian import RELEASED, create_diffusion
from rcdm.errors import UserError
from rcdm.presets import build_unet
from rcdm.sampling import Sampling, draw
from rcdm.train import apply_update, forward_losses, restore, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("group,choices", [
    ("encoder", ["vicreg", "dino", "barlow", "simclr", "supervised"]), ("level", ["backbone", "projector"]),
    ("model", ["tiny", "adm64", "adm128", "adm256"]), ("data", ["demo", "shards"]), ("cluster", ["local", "slurm"]),
    ("tracking", ["local", "server"]), ("storage", ["local", "s3"])])
def test_every_config_group_composes(group, choices, compose_sweep):
    for choice in choices:
        extra = ["data.url=x"] if choice == "shards" else []
        extra += ["storage.run_root=s3://b/r"] if choice == "s3" else []
        cfg = compose_sweep([f"{group}={choice}", *extra])
        tc = train_config(cfg)
        assert isinstance(tc, TrainConfig) and tc.run_root.endswith(f"{cfg.encoder.name}-{cfg.level.name}-{cfg.model.name}")
        if choice == "slurm":
            launcher = cfg.hydra.launcher
            assert launcher._target_.endswith("SlurmLauncher") and launcher.max_num_timeout > 0
            assert launcher.submitit_folder.endswith("%j")


def test_unknown_keys_fail_at_composition_and_dataclass_only_fields_can_be_set(typed):
    """The dataclasses are the schema: a misspelt key is Hydra's own error, and a field that only the
    dataclass declares (no YAML line) is a valid override that reaches the library."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="train.stepz"):
        typed("sweep", ["train.stepz=3"])
    assert "progress" not in (ROOT / "configs" / "sweep.yaml").read_text()
    assert typed("sweep", []).train.progress is True
    assert typed("sweep", ["train.progress=false"]).train.progress is False
    with pytest.raises(ConfigCompositionException, match="synthetic.cout"):
        typed("shard", ["synthetic.cout=3"])
    assert typed("shard", ["synthetic.count=3", "max_rejected_fraction=0.5"]).synthetic.count == 3
    assert typed("pretrain_encoder", ["method=dino"]).method.params["prototypes"] == 4096


def _one_step(compose_sweep, tmp_path, overrides: list[str]) -> dict:
    cfg = compose_sweep(overrides + [f"storage.run_root={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                                     "train.steps=1", "train.batch_size=1", "grid.images=1", "grid.samples=1",
                                     "grid.steps=ddim2", "train.loader_workers=0"])
    ensure_demo_data(train_config(cfg))  # what the app's callback does before any job
    return train(train_config(cfg))


@pytest.mark.parametrize("model", ["tiny"])
def test_one_step_on_each_data_choice(tmp_path, dataset, model, compose_sweep, capfd):
    m = _one_step(compose_sweep, tmp_path, [f"model={model}", "data=shards", f"data.url={dataset}", "encoder=dino"])
    assert m["step"] == 1
    assert "step/s" not in capfd.readouterr().err  # no progress bar when stderr is not a terminal
    demo = tmp_path / "demo"
    m = _one_step(compose_sweep, tmp_path, ["data=demo", f"data.url={demo}", "data.synthetic.counts={train: 32, val: 4}",
                                            "data.synthetic.shard_size=16", "encoder=simclr", "level=projector"])
    assert m["step"] == 1 and (demo / "manifest.json").exists()  # data=demo built itself


@pytest.mark.slow
@pytest.mark.parametrize("model,size,step_px", [("adm64", 64, 64), ("adm128", 128, 64), ("adm256", 256, 64)])
def test_one_step_of_each_large_preset_on_cpu(model, size, step_px):
    """Each large preset builds at its published size, takes one optimisation step through the training
    loop's own update (finite loss; every parameter gets a gradient, as DDP without unused-parameter
    scans needs; the update changes the model) and samples. The loop around it (loader,
    checkpoint, MLflow) is the tiny tests' job: a full-state checkpoint here would be 4.7-8.9 GB of disk.
    adm128 and adm256 step on 64 px images: the same layers and parameters (convolutions, attention placed by
    downsampling factor; adm256's five downsamplings leave 2 px); at 256 px adm256's step took 374 s of a 2-core
    AMD EPYC. The sampler draws at adm64's and adm128's own sizes (the released checkpoints')."""
    torch.manual_seed(0)
    net = build_unet(model, 256)
    assert net.cfg.image_size == size
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    before = [p.detach().clone() for p in net.parameters()]
    x, h, t = torch.rand(1, 3, step_px, step_px) * 2 - 1, torch.randn(1, 256), torch.tensor([500])
    loss = forward_losses(net, create_diffusion(), x, h, t)["loss"].mean()
    assert torch.isfinite(loss) and loss > 0
    assert np.isfinite(apply_update(net, opt, loss, 1.0))
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert not unused, f"parameters outside the graph: {unused[:5]}"
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    del before, opt
    if size > 128:
        return
    with torch.no_grad():
        out = draw(net.eval(), RELEASED, h, Sampling("ddim2", "ddim", batch_size=1), torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, size, size) and torch.isfinite(out).all()


def test_dataset_without_the_requested_encoder_is_refused(tmp_path, dataset, compose_sweep):
    cfg = compose_sweep(["data=shards", f"data.url={dataset}", "encoder=vicreg"])
    with pytest.raises(UserError, match=r"no vicreg backbone embeddings \(encoders: dino \[backbone, projector\]"):
        train(train_config(cfg))
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "-m", "encoder=dino,vicreg",
                        "data=shards", f"data.url={dataset}", f"storage.run_root={tmp_path / 'runs'}",
                        f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert "no vicreg backbone embeddings" in r.stderr and "dino [backbone, projector]" in r.stderr
    assert not (tmp_path / "runs" / "rcdm-demo" / "main" / "dino-backbone-tiny").exists()  # nothing ran


def test_a_crashing_job_does_not_leave_the_sweep_parent_run_running(tmp_path, dataset):
    """Hydra's basic launcher re-raises a job's exception and never calls on_multirun_end: the parent run
    must still end (FAILED), like the job's own run."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "-m", "encoder=dino",
                        "level=backbone,projector", "data=shards", f"data.url={dataset}",
                        f"storage.run_root={tmp_path / 'runs'}", f"tracking.uri={uri}", "train.steps=10",
                        "train.lr=1e30", "train.grad_clip=1e30", "train.loader_workers=0", "train.sample_every=1000",
                        "grid.images=1", "grid.steps=ddim2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "loss is" in r.stderr, r.stderr[-2000:]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [run for run in runs if run.data.tags.get("kind") == "sweep"]
    assert len(parent) == 1 and parent[0].info.status == "FAILED", [(x.data.tags, x.info.status) for x in runs]
    assert len(runs) == 3 and all(run.info.status == "FAILED" for run in runs)  # each job ran, and failed
    assert "ended FAILED" in r.stderr
    # the report still comes, and says why the jobs failed
    html = (tmp_path / "reports" / "rcdm-demo" / "main" / "report.html").read_text()
    assert "0/2 jobs finished" in html and "FAILED before its first logged step: FloatingPointError: loss is" in html


def _ddp_worker(rank: int, world: int, port: int, batch: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_unet("tiny", 8)
    net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # exact in the gradient: Adam would magnify rounding
    diffusion = create_diffusion()
    n = len(batch["x"]) // world
    part = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
    for _ in range(2):
        losses = forward_losses(net, diffusion, part["x"], part["h"], part["t"], part["noise"])
        apply_update(model, opt, losses["loss"].mean(), grad_clip=1.0)
    if rank == 0:
        torch.save(model.state_dict(), out)
    torch.distributed.destroy_process_group()


def test_a_slurm_task_uses_its_cpus_per_task_in_torch_threads():
    """Without CPU binding, every task on a node would start one torch thread per core of the node (4 tasks of
    a 2-core test node: 8 threads, 10 training steps took 80 s); under SLURM torch takes --cpus-per-task,
    unless OMP_NUM_THREADS is set."""
    code = ("import torch; torch.set_num_threads(4); from rcdm import distributed; "
            "distributed.init('cpu'); print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_"))}
    def threads(**extra):
        return int(subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                                  check=True, cwd=ROOT).stdout)
    assert threads(SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="1") == 1
    assert threads(SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="1", OMP_NUM_THREADS="3") == 4  # the user's choice stays
    assert threads(SLURM_CPUS_PER_TASK="1") == 4  # not in a SLURM job: untouched


def test_ddp_on_two_gloo_processes_equals_one_process_on_the_global_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.rand(8, 3, 32, 32, generator=g) * 2 - 1, "h": torch.randn(8, 8, generator=g),
             "t": torch.randint(0, 1000, (8,), generator=g), "noise": torch.randn(8, 3, 32, 32, generator=g)}
    torch.manual_seed(0)
    single = build_unet("tiny", 8)
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    diffusion = create_diffusion()
    for _ in range(2):
        losses = forward_losses(single, diffusion, batch["x"], batch["h"], batch["t"], batch["noise"])
        apply_update(single, opt, losses["loss"].mean(), grad_clip=1.0)
    from pipeline.local_servers import free_port
    out = str(tmp_path / "ddp.pt")
    mp.start_processes(_ddp_worker, args=(2, free_port(), batch, out), nprocs=2, start_method="spawn")
    ddp = torch.load(out)
    changed = 0
    for k, v in single.state_dict().items():
        assert torch.allclose(v, ddp[k], atol=1e-6, rtol=1e-4), k
        changed += not torch.equal(v, build_unet("tiny", 8).state_dict()[k]) if k.endswith("out.2.weight") else 0
    assert changed == 1  # the update did move the (zero-initialised) output layer


def _metric_steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_preemption_signal_checkpoints_and_a_restart_resumes_the_same_run(tmp_path, dataset):
    runs, db = tmp_path / "runs", tmp_path / "m.db"
    args = [sys.executable, str(ROOT / "launch" / "sweep.py"), "encoder=dino", "level=projector", "data=shards",
            f"data.url={dataset}", f"storage.run_root={runs}", f"tracking.uri=sqlite:///{db}", "train.log_every=1",
            "train.checkpoint_every=1000", "train.sample_every=1000", "train.loader_workers=0",
            # the conditioning diagnostic would run at every logged step; the end-of-run evaluation at its full
            # size is the embedded sweep test's
            "diagnostic.images=0", "faithfulness.images=4", "invariance.images=4", "factor_reads.reference_images=256"]
    proc = subprocess.Popen(args + ["train.steps=400"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    job = runs / "rcdm-demo" / "main" / "dino-projector-tiny"
    deadline = time.monotonic() + 300
    while not (job / "mlflow_run.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    run_id = json.loads((job / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{db}")
    while len(_metric_steps(client, run_id)) < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)  # what submitit sends before a time limit or on preemption
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-2000:]
    saved = train_checkpoints.load(train_checkpoints.latest_path(str(job)))
    k = saved["step"]
    assert 5 <= k < 400
    assert client.get_run(run_id).info.status == "KILLED"
    assert saved["mlflow_run_id"] == run_id

    # the checkpoint restores model, EMA and optimizer exactly
    unet = saved["meta"]["unet"]  # the recipe's UNet options, as the checkpoint describes itself
    model, ema = build_unet("tiny", 64, **unet), build_unet("tiny", 64, **unet)
    opt = torch.optim.AdamW(model.parameters())
    step, _, _ = restore(str(job), None, model, ema, opt)
    assert step == k
    for mine, theirs in ((model.state_dict(), saved["model"]), (ema.state_dict(), saved["ema"])):
        assert all(torch.equal(mine[n], theirs[n]) for n in theirs)
    assert not all(torch.equal(model.state_dict()[n], ema.state_dict()[n]) for n in saved["model"])
    assert all(torch.equal(a, b) for a, b in zip(opt.state_dict()["state"][0].values(),
                                                  saved["optimizer"]["state"][0].values()))

    r = subprocess.run(args + [f"train.steps={k + 20}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"at step {k}" in r.stderr + r.stdout  # "resuming from ... at step k"
    assert json.loads((job / "mlflow_run.json").read_text())["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = _metric_steps(client, run_id)
    assert steps == list(range(1, k + 21))  # one continuous step axis, no step twice
    assert train_checkpoints.load(train_checkpoints.latest_path(str(job)))["step"] == k + 20
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no duplicate run


def test_non_finite_loss_stops_with_an_error_and_keeps_the_good_checkpoint(tmp_path, dataset, compose_sweep):
    base = ["data=shards", f"data.url={dataset}", "encoder=dino", f"storage.run_root={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "train.loader_workers=0", "train.checkpoint_every=2",
            "train.sample_every=1000", "grid.images=1", "grid.steps=ddim2"]
    cfg = compose_sweep(base + ["train.steps=2"])
    train(train_config(cfg))
    job = train_config(cfg).run_root
    good = train_checkpoints.latest_path(job)
    cfg = compose_sweep(base + ["train.steps=10", "train.lr=1e30", "train.grad_clip=1e30"])
    with pytest.raises(FloatingPointError, match="loss is"):
        train(train_config(cfg))
    assert train_checkpoints.latest_path(job) == good
    assert all(torch.isfinite(v).all() for v in train_checkpoints.load(good)["model"].values())
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run_id = json.loads((Path(job) / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FAILED"


SWEEP_ENCODERS = ("vicreg",)  # of the README's four: simclr and dino train in tests/test_cluster.py's sweeps, barlow
# in test_train_on_s3_then_sample_from_its_checkpoint


@pytest.mark.slow
def test_the_embedded_default_sweep(tmp_path):
    """The README's main command on a fresh working directory, on one of its four encoders (both levels, the
    demo's own budget, each job from the shipped decoder): demo data, 2 jobs, 2 finished runs, the report. All eight
    jobs took 15 min 30 s of a 2-core AMD EPYC with nothing else running, two at a time (README); CI's machines differ by 1.5x,
    and one CI run of the suite with four encoders did not end in its 90 minutes. The other encoders train in the cluster tests; all eight jobs'
    composition is tests/test_experiments.py's plan test."""
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "-m", f"encoder={','.join(SWEEP_ENCODERS)}",
                        "level=backbone,projector"], cwd=tmp_path, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stderr[-3000:]
    n = 2 * len(SWEEP_ENCODERS)
    assert f"{n}/{n} jobs finished" in r.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rcdm-demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if x.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == n
    assert {(c.data.tags["encoder"], c.data.tags["level"]) for c in children} == {
        (e, lv) for e in SWEEP_ENCODERS for lv in ("backbone", "projector")}
    chance = sum(1 / k for k in range(1, 65)) / 64
    for c in children:
        assert c.info.status == "FINISHED"
        backbone = c.data.tags["level"] == "backbone"
        losses = [m.value for m in sorted(client.get_metric_history(c.info.run_id, "loss"), key=lambda m: m.step)]
        assert len(losses) == (12 if backbone else 3) and losses[-1] < losses[0]  # a falling loss curve
        for key in ("mse", "loss_q0", "loss_q3", "grad_norm", "lr", "images_per_s", "data_wait_fraction",
                    "train_seconds", *(f"cond_gain_q{k}" for k in range(4)), "null_gain_q3"):
            assert key in c.data.metrics, key
        grids = [a.path for a in client.list_artifacts(c.info.run_id, "samples")]
        assert grids == ([f"samples/step-{s:09d}.png" for s in (120, 240, 360, 480)] if backbone
                         else ["samples/step-000000120.png"])
        # it started from the shipped decoder, its own conditioning input learned from zero
        start = json.loads((tmp_path / "runs" / "rcdm-demo" / "main" / f"{c.data.tags['encoder']}-"
                            f"{c.data.tags['level']}-tiny" / "init_from.json").read_text())
        assert (start["source"], start["parts"], start["source_encoder"]) == (
            "demo:dino-backbone", "decoder", "dino backbone")
        assert c.data.params["encoder.name"] == c.data.tags["encoder"] and c.data.params["recipe.name"] == "vpred"
        # the faithfulness protocol ran at the end, on the 64 held-out embeddings, and beat chance
        faith = json.loads((tmp_path / "runs" / "rcdm-demo" / "main" / f"{c.data.tags['encoder']}-"
                            f"{c.data.tags['level']}-tiny" / "faithfulness.json").read_text())
        assert faith["guidance"] == 1 and faith["chance"]["mrr"] == pytest.approx(chance)
        assert c.data.metrics["faithfulness_mrr"] == pytest.approx(faith["mrr"]) and faith["mrr_ci95"][0] > chance
        # the model uses its embedding where sampling decides colour, background and position
        assert c.data.metrics["cond_gain_q3"] > 0.3
        assert {"faithfulness.json", "conditioning.json", "invariance.json"} <= {
            a.path for a in client.list_artifacts(c.info.run_id)}
        assert c.data.tags["code_version"] and len(c.data.tags["dataset_manifest_sha256"]) == 64
    # the sweep report on the parent run, with every job's row and grid
    assert "report reports/rcdm-demo/main/report.html" in r.stdout
    html = (tmp_path / "reports" / "rcdm-demo" / "main" / "report.html").read_text()
    assert f"{n}/{n} jobs finished" in html and html.count('class="grid"') == n and "without a finished result" not in html
    assert "report/report.html" in {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}


def test_train_on_s3_then_sample_from_its_checkpoint(tmp_path, s3_bucket, make_dataset, compose_sweep):
    """Data and run root on a real S3-API server; launch/sample.py reads the job's own checkpoint."""
    endpoint, opts, fs = s3_bucket
    make_dataset("s3://bucket/ds", train=32, val=4, encoders=["barlow"], storage=opts)
    cfg = compose_sweep(["data=shards", "data.url=s3://bucket/ds", "encoder=barlow", "level=projector",
                         "storage=s3", "storage.run_root=s3://bucket/runs", f"storage.endpoint_url={endpoint}",
                         f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "train.steps=4", "train.checkpoint_every=2",
                         "train.sample_every=4", "grid.images=2", "grid.samples=2", "grid.steps=ddim3"])
    assert train(train_config(cfg))["step"] == 4
    job = "bucket/runs/rcdm-demo/main/barlow-projector-tiny"
    fs.invalidate_cache()
    assert fs.exists(f"{job}/checkpoints/ckpt-000000004.pt") and fs.exists(f"{job}/samples/step-000000004.png")
    assert not fs.exists(f"{job}/checkpoints/ckpt-000000002.pt") or fs.exists(f"{job}/checkpoints/latest.json")
    images = tmp_path / "imgs"
    images.mkdir()
    from rcdm.synthetic import sample as synth
    synth(0, "val", 0, 32)[0].save(images / "a.png")
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), f"checkpoint=s3://{job}",
                        f"images={images}", "num_samples=3", "steps=ddim5", f"endpoint_url={endpoint}",
                        f"output={tmp_path / 'grid.png'}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image
    assert Image.open(tmp_path / "grid.png").size == (2 + 4 * 34, 2 + 34)
