"""The local sweep's launcher (hydra_plugins/rcdm_launcher/local.py): jobs side by side where that trains faster,
with the guarantees one process gave (job order, a failing job, an exiting job, the launcher stopped)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.local_jobs import JOB_BYTES, local_plan
from rcdm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["train.batch_size=8", "train.log_every=1", "train.loader_workers=0", "grid.images=2", "grid.samples=1",
         "grid.steps=ddim2", "faithfulness.images=0", "invariance.images=0", "diagnostic.images=0"]
GIB = 2**30


def test_side_by_side_is_chosen_for_the_tiny_model_on_cpus_within_cores_and_memory():
    two = local_plan(8, 0, True, 2, 24 * GIB)
    assert (two.at_once, two.threads) == (2, 1) and "2 jobs at once" in two.why
    assert (local_plan(8, 0, True, 16, 64 * GIB).at_once, local_plan(8, 0, True, 16, 64 * GIB).threads) == (8, 2)
    assert local_plan(8, 0, True, 16, 3 * JOB_BYTES + 1).at_once == 3  # the memory bounds it
    assert local_plan(8, 0, True, 2, None).at_once == 2  # no /proc/meminfo: the cores alone
    for one in (local_plan(1, 0, True, 2, 24 * GIB),  # one job
                local_plan(8, 0, False, 2, 24 * GIB),  # a GPU, or a model whose side-by-side rate is unmeasured
                local_plan(8, 0, True, 1, 24 * GIB),  # one core
                local_plan(8, 0, True, 2, JOB_BYTES - 1),  # not the memory for two
                local_plan(8, 1, True, 16, 64 * GIB)):  # asked for
        assert (one.at_once, one.threads) == (1, 0), one
    asked = local_plan(8, 3, False, 2, 24 * GIB)
    assert (asked.at_once, asked.threads) == (3, 1) and "cluster.jobs_at_once=3" in asked.why
    with pytest.raises(UserError, match="cluster.jobs_at_once=-1 must be 0"):
        local_plan(8, -1, True, 2, None)


def sweep(tmp_path: Path, dataset: str, *extra: str, wait: bool = True):
    args = [sys.executable, str(ROOT / "launch" / "sweep.py"), "-m", "encoder=dino", "level=backbone,projector",
            "data=shards", f"data.url={dataset}", f"storage.run_root={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "cluster.jobs_at_once=2", *QUICK, *extra]
    if wait:
        return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(args, cwd=tmp_path, stdout=open(tmp_path / "out.txt", "w"),
                            stderr=open(tmp_path / "err.txt", "w"), text=True)


def runs(tmp_path: Path) -> dict:
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {r.data.tags.get("kind") or r.info.run_name: r for r in found}


def test_two_jobs_train_at_once_each_on_its_share_of_the_cores(tmp_path, dataset):
    r = sweep(tmp_path, dataset, "train.steps=6", "train.checkpoint_every=3", "train.sample_every=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 jobs at once" in r.stdout and "2/2 jobs finished" in r.stdout
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert r.stdout.count(f"{threads} torch thread{'s' if threads > 1 else ''} of") == 2, r.stdout[-3000:]
    found = runs(tmp_path)
    a, b = found["dino-backbone-tiny"], found["dino-projector-tiny"]
    assert found["sweep"].info.status == a.info.status == b.info.status == "FINISHED"
    assert a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time  # they overlapped
    for name in ("dino-backbone-tiny", "dino-projector-tiny"):  # each a Hydra job of its own, in the sweep folder
        assert (tmp_path / "multirun" / "rcdm-demo" / "main" / name / ".hydra" / "overrides.yaml").is_file()
    assert (tmp_path / "reports" / "rcdm-demo" / "main" / "report.html").is_file()


def test_a_job_that_exits_stops_the_sweep_and_no_run_is_left_running(tmp_path, dataset):
    r = sweep(tmp_path, dataset, "encoder=dino,dino", "train.steps=2", "train.init_from=/nowhere/model.pt")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error: train.init_from=/nowhere/model.pt" in r.stderr and "2 job(s) not started" in r.stderr
    assert all(run.info.status != "RUNNING" for run in runs(tmp_path).values())
    assert runs(tmp_path)["sweep"].info.status == "FAILED"


def test_a_stopped_launcher_lets_its_jobs_checkpoint_and_the_same_command_resumes_them(tmp_path, dataset):
    steps = ["train.steps=400", "train.checkpoint_every=2", "train.sample_every=1000"]
    p = sweep(tmp_path, dataset, *steps, wait=False)
    ckpts = tmp_path / "runs" / "rcdm-demo" / "main"
    deadline = time.time() + 300
    while time.time() < deadline and len({c.parents[1] for c in ckpts.glob("*/checkpoints/ckpt-*.pt")}) < 2:
        time.sleep(1)  # each job has saved a checkpoint
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=300) != 0
    err = (tmp_path / "err.txt").read_text()
    assert "told to checkpoint and end" in err and err.count("preempted: checkpointed at step") == 2, err[-3000:]
    found = runs(tmp_path)
    assert found["dino-backbone-tiny"].info.status == found["dino-projector-tiny"].info.status == "KILLED"
    assert found["sweep"].info.status == "FAILED"
    stopped = {d.name: max(int(c.stem.split("-")[1]) for c in (d / "checkpoints").glob("ckpt-*.pt"))
               for d in ckpts.iterdir() if (d / "checkpoints").is_dir()}
    assert len(stopped) == 2, stopped
    r = sweep(tmp_path, dataset, *steps, "train.steps=" + str(max(stopped.values()) + 2))
    assert r.returncode == 0, r.stderr[-3000:]
    for name, step in stopped.items():
        assert f"{name}/checkpoints/ckpt-{step:09d}.pt at step {step}" in r.stdout  # resumed where it stopped
    assert all(run.info.status == "FINISHED" for run in runs(tmp_path).values())
