"""Launching safely: one job per run folder (a lease), no credential on disk or console from any launcher even
when a job fails, failures that end every run they started, and config values refused where they are declared."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rcdm.errors import UserError
from rcdm.lease import LEASE, Lease
from rcdm.train import train

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2", "train.sample_every=2",
         "train.loader_workers=0", "grid.images=2", "grid.samples=1", "grid.steps=ddim2", "faithfulness.images=0",
         "invariance.images=0", "diagnostic.images=0"]


def job(typed, dataset, tmp_path, *extra):
    return typed("sweep", ["encoder=dino", "level=backbone", "data=shards", f"data.url={dataset}",
                           f"storage.run_root={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                           *QUICK, *extra])


def runs(tmp_path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


# ---- the lease --------------------------------------------------------------------------------------------------

def write_lease(cfg, **holder) -> Path:
    path = Path(cfg.run_root) / LEASE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": "", "token": "t",
                                "expires": time.time() + 600, "started": "then", **holder}))
    return path


def test_a_second_launch_of_a_job_is_refused_with_who_holds_it(typed, dataset, tmp_path):
    cfg = job(typed, dataset, tmp_path, "train.lr=5e-4")
    holder = subprocess.Popen(["sleep", "60"])  # a live process on this host holds the run folder
    try:
        write_lease(cfg, pid=holder.pid)
        with pytest.raises(UserError, match=rf"in use by another launch of this job \(pid {holder.pid} on "):
            train(cfg)
    finally:
        holder.kill()
    assert not runs(tmp_path) and not (Path(cfg.run_root) / "checkpoints").exists()  # nothing touched


@pytest.mark.parametrize("holder", ["expired", "dead process", "same SLURM job", "unreadable"])
def test_a_stale_lease_is_taken_over(typed, dataset, tmp_path, monkeypatch, holder):
    cfg = job(typed, dataset, tmp_path)
    if holder == "expired":
        path = write_lease(cfg, host="another-host", expires=time.time() - 1)
    elif holder == "dead process":
        gone = subprocess.Popen(["true"])
        gone.wait()
        path = write_lease(cfg, pid=gone.pid)
    elif holder == "same SLURM job":  # a requeue: same job id, new process, lease not yet expired
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        path = write_lease(cfg, host="another-host", slurm_job_id="4242")
    else:
        path = write_lease(cfg)
        path.write_text("{not json")
    assert train(cfg)["step"] == 2
    assert not path.exists()  # released at the end


def test_a_job_that_loses_its_lease_stops(tmp_path):
    lease = Lease(str(tmp_path / "run"), ttl_s=2)
    lease.acquire()
    try:
        (tmp_path / "run" / LEASE).write_text(json.dumps({"host": "h", "pid": 1, "token": "other",
                                                                   "expires": time.time() + 600}))
        deadline = time.time() + 10
        while lease.lost is None and time.time() < deadline:
            time.sleep(0.2)
        with pytest.raises(UserError, match="taken by pid 1 on h"):
            lease.check()
    finally:
        lease.release()
    assert (tmp_path / "run" / LEASE).exists()  # the other holder's lease is left alone


@pytest.mark.slow
def test_two_launches_of_one_job_at_once(dataset, tmp_path):
    """The red team's case: the same job launched twice, the second with another lr. The second is refused;
    the one run's params describe the model that was trained."""
    base = [sys.executable, str(ROOT / "launch" / "sweep.py"), "encoder=dino", "level=backbone", "data=shards",
            f"data.url={dataset}", f"storage.run_root={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
            "train.batch_size=8", "train.loader_workers=0", "faithfulness.images=0", "invariance.images=0",
            "diagnostic.images=0", "grid.images=2", "grid.steps=ddim2", "train.sample_every=1000"]
    first = subprocess.Popen([*base, "train.steps=400"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lease = tmp_path / "runs" / "rcdm-demo" / "main" / "dino-backbone-tiny" / LEASE
        deadline = time.time() + 300
        while not lease.exists() and time.time() < deadline:
            time.sleep(0.5)
        assert lease.exists()
        second = subprocess.run([*base, "train.steps=400", "train.lr=5e-4"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2 and "in use by another launch of this job" in second.stderr, second.stderr
    finally:
        first.terminate()
        first.wait(timeout=120)
    (run,) = runs(tmp_path)
    assert run.data.params["train.lr"] != "0.0005"


# ---- credentials ------------------------------------------------------------------------------------------------

KEY, SECRET = "AKIDLAUNCH77", "SEKRIT789launch"


def _launch(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TORCH_HOME": str(tmp_path / "torch")})


def _leaks(tmp_path: Path, *outputs: str) -> list[str]:
    seen = [("console", o) for o in outputs]
    seen += [(str(p), p.read_bytes().decode("latin-1")) for p in tmp_path.rglob("*") if p.is_file()]
    return [where for where, text in seen for s in (KEY, SECRET) if s in text]


@pytest.mark.parametrize("script, args", [
    ("shard.py", ["output=s3://bucket/ds", "synthetic.count=2", "storage.endpoint_url=http://{creds}@127.0.0.1:9"]),
    ("sample.py", ["checkpoint=s3://bucket/run", "images=a.png", "endpoint_url=http://{creds}@127.0.0.1:9",
                   "device=cpu"]),
    ("analyze.py", ["analysis=faithfulness", "checkpoint=s3://bucket/run", "images=synthetic:4",
                    "endpoint_url=http://{creds}@127.0.0.1:9", "device=cpu"]),
    ("sweep.py", ["-m", "storage=s3", "storage.run_root=s3://bucket/runs",
                  "storage.endpoint_url=http://{creds}@127.0.0.1:9"]),
    ("sweep.py", ["tracking.uri=http://{creds}@127.0.0.1:9"]),
])
def test_no_launcher_writes_or_prints_a_credential_when_it_fails(tmp_path, script, args):
    """Each fails (nothing listens on port 9): Hydra has saved its configs, and prints what it prints for a
    failing job; none of it holds the key or the secret."""
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    r = _launch(tmp_path, script, *[a.replace("{creds}", f"{KEY}:{SECRET}") for a in args])
    assert r.returncode != 0
    assert list(tmp_path.rglob("overrides.yaml")) or script == "sweep.py"  # Hydra did save its files
    assert not _leaks(tmp_path, r.stdout, r.stderr), (_leaks(tmp_path, r.stdout, r.stderr), r.stderr[-2000:])


def test_a_failing_job_prints_its_error_masked_not_hydras_raw_overrides(tmp_path):
    """A job that fails with an error that is not a UserError: the launcher prints the traceback and one `error:`
    line with every credential masked (rcdm.errors.cli_errors), exit 1; Hydra never prints the raw overrides."""
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    r = _launch(tmp_path, "sample.py", "checkpoint=s3://bucket/run", "images=a.png", "device=cpu",
                f"endpoint_url=http://{KEY}:{SECRET}@127.0.0.1:9")
    assert r.returncode == 1 and "Traceback" in r.stderr and "\nerror: EndpointConnectionError" in r.stderr, r.stderr
    assert "Error executing job with overrides" not in r.stderr
    assert KEY not in r.stderr and SECRET not in r.stderr


# ---- failure paths ----------------------------------------------------------------------------------------------

def sweep(tmp_path: Path, dataset: str, *extra: str) -> subprocess.CompletedProcess:
    return _launch(tmp_path, "sweep.py", "-m", "encoder=dino", "level=backbone", "data=shards", f"data.url={dataset}",
                   f"storage.run_root={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", *QUICK,
                   *extra)


def test_an_unreachable_tracking_server_is_refused_at_once(tmp_path, dataset):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    t0 = time.time()
    r = sweep(tmp_path, dataset, f"tracking.uri=http://127.0.0.1:{port}")
    assert r.returncode == 2 and time.time() - t0 < 60, r.stderr[-2000:]
    assert f"the MLflow tracking server at http://127.0.0.1:{port} does not answer" in r.stderr
    assert not (tmp_path / "runs").exists()  # no job started


def test_an_unwritable_run_root_leaves_no_run_running(tmp_path, dataset):
    (tmp_path / "file").write_text("a file, not a folder")
    r = sweep(tmp_path, dataset, f"storage.run_root={tmp_path / 'file' / 'runs'}")
    assert r.returncode == 2 and "cannot write under storage.run_root" in r.stderr, r.stderr[-2000:]
    assert all(run.info.status != "RUNNING" for run in runs(tmp_path))


def test_a_failing_set_up_of_any_kind_stops_the_sweep(tmp_path, dataset):
    """Hydra turns a callback's exception into a warning and launches the jobs anyway; rcdm stops instead."""
    broken = tmp_path / "ds"
    import shutil

    shutil.copytree(dataset, broken)
    (broken / "manifest.json").write_text("{")
    r = sweep(tmp_path, str(broken))
    assert r.returncode == 2 and "is not a valid rcdm dataset manifest" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "runs" / "rcdm-demo" / "main" / "dino-backbone-tiny").exists()


# ---- config values ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.steps=-5", "train.steps=-5 must be at least 1"),
    ("train.batch_size=0", "train.batch_size=0 must be at least 1"),
    ("train.lr=0", "train.lr=0.0 must be a positive finite number"),
    ("sweep_id=../../outside", "sweep_id='../../outside' must be one folder name"),
    ("data.split=../x", "data.split='../x' must be one folder name"),
    ("recipe.cond_drop=1.5", "recipe.cond_drop=1.5 is out of range"),
    ("model.name=huge", "unknown model 'huge'"),
])
def test_config_values_are_refused_where_they_are_declared(typed, override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        typed("sweep", [override])


def test_a_shard_split_that_is_a_path_is_refused(tmp_path):
    from sharding.config import ShardJob, SyntheticInput
    from sharding.orchestrate import shard

    with pytest.raises(UserError, match="split='../../outside' must be one folder name"):
        shard(ShardJob(output=str(tmp_path / "out"), split="../../outside", synthetic=SyntheticInput(2)))
    assert not any(tmp_path.rglob("*.tar"))


def test_a_model_that_does_not_fit_the_images_is_refused_before_it_is_built(typed, dataset, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr("rcdm.train.RCDMUNet.__init__", lambda *a, **k: built.append(1))
    with pytest.raises(UserError, match="model=adm128 is for 128 px images but the dataset holds 32 px"):
        train(job(typed, dataset, tmp_path, "model=adm128"))
    assert not built


def test_a_resume_with_another_recipe_says_use_a_new_sweep_id(typed, dataset, tmp_path):
    train(job(typed, dataset, tmp_path))
    with pytest.raises(UserError, match="trained with another model or recipe .* give this job a new sweep_id"):
        train(job(typed, dataset, tmp_path, "recipe=adm", "train.steps=4"))
    assert [r.info.status for r in runs(tmp_path)] == ["FINISHED"]


def test_a_lease_is_held_while_training(typed, dataset, tmp_path, monkeypatch):
    seen = []
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append((Path(tmp_path / "runs" / "rcdm-demo" / "main" / "dino-backbone-tiny" / LEASE)).exists())
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(job(typed, dataset, tmp_path))
    assert seen == [True, True]
