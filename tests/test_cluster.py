"""The cluster run on real components: a SLURM cluster of two slurmd nodes (with slurmdbd accounting),
an S3-API server and an MLflow server, all started on 127.0.0.1 by scripts/stack_up.sh and stopped by
scripts/stack_down.sh even when a test fails. The tests do what a user does: shard to s3:// as a SLURM
array, run the sweep with cluster=slurm on 2 nodes per job (DDP over gloo), and survive a requeue.

They need root on a Debian host (the stack installs slurm-wlm, munge, slurmdbd and MariaDB with apt);
CI is such a host. Elsewhere they skip, saying why.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from pipeline.local_servers import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SWEEP_ENCODERS = ["simclr"]  # vicreg trains in the embedded sweep test, dino in the no-wait sweep, barlow in
# tests/test_training.py's S3 training test
SWEEP_LEVELS = ["backbone", "projector"]


def _two_free_ports() -> int:
    """A free port p with p + 1 free too (the two slurmd nodes listen on consecutive ports)."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


@pytest.fixture(scope="module")
def stack():
    """The started stack's environment (SLURM_CONF, AWS_*, MLFLOW_TRACKING_URI) merged into os.environ."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM stack needs root (it installs and runs slurm-wlm, munge, slurmdbd, MariaDB)")
    if not (shutil.which("slurmctld") or shutil.which("apt-get")):
        pytest.skip("the SLURM stack needs Debian's slurm-wlm packages (apt-get not found)")
    d = tempfile.mkdtemp(prefix="rcdm-stack-", dir="/tmp")
    os.chmod(d, 0o755)  # the mysql and munge users must reach their directories inside it
    env = {**os.environ, "RCDM_STACK_DIR": d, "PYTHON": sys.executable,
           "RCDM_S3_PORT": str(free_port()), "RCDM_MLFLOW_PORT": str(free_port()),
           "RCDM_SLURMCTLD_PORT": str(free_port()), "RCDM_SLURMDBD_PORT": str(free_port()),
           "RCDM_SLURMD_PORTS": str(_two_free_ports()), "RCDM_DB_PORT": str(free_port())}
    env.pop("RCDM_S3_ENDPOINT", None)  # the tests' S3 is always the local moto server
    try:
        up = subprocess.run(["bash", str(ROOT / "scripts/stack_up.sh")], env=env, capture_output=True, text=True,
                            timeout=600)
        if up.returncode != 0:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(Path(d, "log").glob("*")))
            pytest.fail(f"stack_up.sh failed ({up.returncode}):\n{up.stderr[-3000:]}\n{logs}")
        for line in Path(d, "env.sh").read_text().splitlines():
            if line.startswith("export "):
                k, v = line[len("export "):].split("=", 1)
                env[k] = v
        yield env
    finally:
        subprocess.run(["bash", str(ROOT / "scripts/stack_down.sh")], env=env, timeout=180)
        shutil.rmtree(d, ignore_errors=True)


def _run(cmd: list[str], env: dict, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd[:3])} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"}


def _sacct(env: dict, job: str, fields: str, *extra: str, wait_s: float = 60) -> list[list[str]]:
    """sacct rows once every record of ``job`` has ended: a job's result file (what the launcher waits
    for) is written before slurmctld records the job COMPLETED."""
    state = fields.split(",").index("State")
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run(["sacct", "-n", "-P", "-j", job, "-o", fields, *extra], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout
        rows = [line.split("|") for line in out.splitlines() if line.strip()]
        if (rows and not any(r[state] in ACTIVE_STATES for r in rows)) or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def _s3_keys(env: dict, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=env["RCDM_S3_BUCKET"], Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


SLURM_SMALL = ["cluster=slurm", "cluster.mem_gb=1", "cluster.cpus_per_task=1", "cluster.time_min=10"]
# the end-of-run evaluation on 4 held-out images: these tests are about the cluster path; the evaluation's own
# tests (and the embedded sweep's) run it at full size
SMALL_EVAL = ["faithfulness.images=4", "invariance.images=4", "factor_reads.reference_images=256"]


@pytest.fixture(scope="module")
def dataset(stack, tmp_path_factory):
    """The demo data sharded to s3:// by a 2-task SLURM array (train) and one task (val)."""
    cwd = tmp_path_factory.mktemp("shard")
    url = f"s3://{stack['RCDM_S3_BUCKET']}/demo-{uuid.uuid4().hex[:6]}"
    common = [sys.executable, str(ROOT / "launch/shard.py"), "storage=s3", f"output={url}", "shard_size=64",
              *SLURM_SMALL, f"cluster.folder={cwd}/logs/%j"]
    p = _run(common + ["synthetic.count=256", "workers=2"], stack, cwd, 900)
    assert "256 samples in split train (0 rejected)" in p.stdout
    _run(common + ["split=val", "synthetic.count=16", "workers=1"], stack, cwd, 600)
    return url, cwd


def test_shards_written_by_a_slurm_array(stack, dataset):
    url, cwd = dataset
    bucket_prefix = url.split("/", 3)[3]
    keys = _s3_keys(stack, bucket_prefix + "/")
    assert f"{bucket_prefix}/manifest.json" in keys
    assert sum(k.startswith(f"{bucket_prefix}/images/train-") and k.endswith(".tar") for k in keys) == 4
    # the train split ran as an array of 2 tasks, both COMPLETED in the accounting database
    job_dirs = sorted(p.name for p in (cwd / "logs").iterdir())
    arrays = [j for j in job_dirs if j.endswith("_1")]
    assert arrays, f"no array task folders in {job_dirs}"
    rows = _sacct(stack, arrays[0].split("_")[0], "JobID,State", "-X")
    assert sorted(r[0] for r in rows) == [arrays[0].split("_")[0] + "_0", arrays[0]]
    assert all(r[1] == "COMPLETED" for r in rows), rows


def test_sweep_on_two_nodes_per_job(stack, dataset, tmp_path):
    """The used-by sweep with cluster=slurm: 2 jobs of 2 nodes x 1 task each, data and runs on s3://,
    tracking to the MLflow server whose artifacts live in the S3 store."""
    from mlflow.tracking import MlflowClient

    url, _ = dataset
    run_root = f"s3://{stack['RCDM_S3_BUCKET']}/runs"
    experiment = f"it-{uuid.uuid4().hex[:6]}"
    p = _run([sys.executable, str(ROOT / "launch/sweep.py"), "-m", f"encoder={','.join(SWEEP_ENCODERS)}",
              f"level={','.join(SWEEP_LEVELS)}", *SLURM_SMALL, "cluster.nodes=2", "cluster.tasks_per_node=1",
              "data=shards", f"data.url={url}", "storage=s3", f"storage.run_root={run_root}", "tracking=server",
              f"tracking.experiment={experiment}", "train.steps=10", "train.batch_size=8", "train.log_every=5",
              "train.checkpoint_every=10", "train.sample_every=10", "train.loader_workers=0", "grid.images=2",
              "grid.samples=1", "grid.steps=ddim5", *SMALL_EVAL], stack, tmp_path, 2400)
    n = len(SWEEP_ENCODERS) * len(SWEEP_LEVELS)
    assert f"{n}/{n} jobs finished" in p.stdout + p.stderr

    client = MlflowClient(stack["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == n
    assert {(r.data.tags["encoder"], r.data.tags["level"]) for r in children} == {
        (e, lv) for e in SWEEP_ENCODERS for lv in SWEEP_LEVELS}
    artifact_keys = _s3_keys(stack, "mlflow-artifacts/")
    for r in children:
        assert r.info.status == "FINISHED", r.data.tags
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.tags["world_size"] == "2"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [5, 10]
        grids = [k for k in artifact_keys if r.info.run_id in k and k.endswith(".png")]
        assert grids, f"no sample grid of run {r.info.run_id} in the S3 artifact store"
        job = f"{r.data.tags['encoder']}-{r.data.tags['level']}-tiny"
        latest = _s3_keys(stack, f"runs/{experiment}/main/{job}/checkpoints/")
        assert any(k.endswith("latest.json") for k in latest) and any(k.endswith(".pt") for k in latest), latest
        # the SLURM record: 2 nodes, completed
        (row,) = _sacct(stack, r.data.tags["slurm_job_id"], "NNodes,State", "-X")
        assert row == ["2", "COMPLETED"], (r.data.tags["slurm_job_id"], row)
    # the sweep report, written by the launcher after the SLURM jobs, from the server and its S3 artifacts
    html = (tmp_path / "reports" / experiment / "main" / "report.html").read_text()
    assert f"{n}/{n} jobs finished" in html and html.count('class="grid"') == n
    assert any(k.endswith("/report/report.html") and parents[0].info.run_id in k
               for k in _s3_keys(stack, "mlflow-artifacts/"))


def test_requeue_resumes_the_same_run(stack, dataset, tmp_path):
    """Preemption on a real SLURM cluster: once the job has trained a few steps, SLURM signals it with USR2 (what a
    preemption or the time limit's --signal sends; scancel --signal here, so the test does not wait out a time limit
    whose length depends on the machine's speed), it checkpoints, submitit requeues it, the new start resumes at the
    saved step, and the MLflow run goes on without a gap or a repeated step. The time-limit path's own wiring, the
    sbatch --signal line, is checked in the job's script."""
    from mlflow.tracking import MlflowClient

    url, _ = dataset
    experiment = f"requeue-{uuid.uuid4().hex[:6]}"
    steps, every, delay = 120, 5, 30
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "launch/sweep.py"), "-m", "encoder=vicreg", "level=backbone",
         "cluster=slurm", "cluster.mem_gb=1", "cluster.cpus_per_task=2", "cluster.time_min=20",
         f"cluster.signal_delay_s={delay}", "cluster.max_num_timeout=3", "data=shards", f"data.url={url}",
         "storage=s3", f"storage.run_root=s3://{stack['RCDM_S3_BUCKET']}/runs", "tracking=server",
         f"tracking.experiment={experiment}", f"train.steps={steps}", "train.batch_size=16", f"train.log_every={every}",
         "train.checkpoint_every=100000", "train.sample_every=100000", "train.loader_workers=0",
         *SMALL_EVAL, "diagnostic.images=0", "grid.images=2", "grid.samples=1", "grid.steps=ddim5"],
        env=stack, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(stack["MLFLOW_TRACKING_URI"])
    try:
        deadline, run = time.monotonic() + 600, None
        while time.monotonic() < deadline:  # until the job has logged its first steps: its handler is in place
            exp = client.get_experiment_by_name(experiment)
            found = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags] \
                if exp else []
            if found and client.get_metric_history(found[0].info.run_id, "loss"):
                run = found[0]
                break
            assert launcher.poll() is None, launcher.communicate()
            time.sleep(1)
        assert run is not None, "the job did not log a step within 10 minutes"
        job_id = run.data.tags["slurm_job_id"]
        subprocess.run(["scancel", "--signal=USR2", job_id], env=stack, check=True, timeout=60)
        out, err = launcher.communicate(timeout=1500)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, f"{out[-3000:]}\n{err[-5000:]}"

    exp = client.get_experiment_by_name(experiment)
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1, "a requeued job must continue its run, not start another"
    run = children[0]
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["slurm_restart_count"]) >= 1, "the job finished without being requeued"
    resumed_at = int(run.data.tags["started_at_step"])  # where the last start picked up
    assert 0 < resumed_at < steps
    history = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert history == list(range(every, steps + 1, every)), history  # continuous, each step once

    # the logs of the last start say where it resumed; the signalled start says it checkpointed there
    logs = "".join(p.read_text() for p in tmp_path.rglob(f"{job_id}_0_log.*"))
    resumes = [int(k) for k in re.findall(r"resuming from \S+ at step (\d+)\b", logs)]
    assert resumes == [resumed_at], (resumes, resumed_at)
    assert re.search(rf"checkpoint \S+ \(step {resumed_at}\)", logs), f"no checkpoint at the signal ({resumed_at})"
    states = [r[0] for r in _sacct(stack, job_id, "State", "-X", "--duplicates")]
    assert "REQUEUED" in states or "PREEMPTED" in states, states
    assert states[-1] == "COMPLETED", states
    # a time limit sends the same signal: the job's script asks SLURM for it signal_delay_s before the limit
    scripts = "".join(p.read_text() for p in tmp_path.rglob("*_submission.sh"))
    assert f"#SBATCH --signal=USR2@{delay}" in scripts, scripts[:2000]


def test_sweep_that_does_not_wait(stack, dataset, tmp_path):
    """cluster.wait=false: the launcher submits, records the sweep beside its parent run and returns while the jobs
    still run; launch/status.py, from another process, follows them from sacct and MLflow. A cancelled job ends the
    sweep FAILED once the other one completes; launched again, the cancelled job is resubmitted into the same parent
    run, and status ends that FINISHED with its report."""
    import json

    import boto3
    from mlflow.tracking import MlflowClient

    url, _ = dataset
    experiment = f"nowait-{uuid.uuid4().hex[:6]}"
    common = [*SLURM_SMALL, "cluster.wait=false", "data=shards", f"data.url={url}", "storage=s3",
              f"storage.run_root=s3://{stack['RCDM_S3_BUCKET']}/runs", "tracking=server",
              f"tracking.experiment={experiment}", "train.steps=10", "train.batch_size=8", "train.checkpoint_every=10",
              "train.sample_every=10", "train.loader_workers=0", "grid.images=2", "grid.samples=1", "grid.steps=ddim5",
              *SMALL_EVAL]
    sweep = [sys.executable, str(ROOT / "launch/sweep.py"), "-m", "level=backbone", *common]
    status = [sys.executable, str(ROOT / "launch/status.py"), "-m", "encoder=vicreg,dino", "level=backbone", *common]
    s3 = boto3.client("s3", endpoint_url=stack["AWS_ENDPOINT_URL"], region_name=stack["AWS_DEFAULT_REGION"],
                      aws_access_key_id=stack["AWS_ACCESS_KEY_ID"], aws_secret_access_key=stack["AWS_SECRET_ACCESS_KEY"])

    def record() -> dict:
        key = f"runs/{experiment}/main/submitted.json"
        return json.loads(s3.get_object(Bucket=stack["RCDM_S3_BUCKET"], Key=key)["Body"].read())

    def by_encoder(jobs: list[dict]) -> dict[str, str]:
        return {next(o for o in j["overrides"] if o.startswith("encoder=")): j["slurm_job_id"] for j in jobs}

    def status_until_ended() -> str:
        deadline = time.monotonic() + 600  # the whole test takes about 2.5 minutes on a 2-core AMD EPYC
        while time.monotonic() < deadline:
            p = _run(status, stack, tmp_path, 300)
            out = p.stdout + p.stderr
            if "parent MLflow run" in p.stdout and " ended " in p.stdout.splitlines()[-1]:
                return out
            time.sleep(3)
        raise AssertionError(f"the sweep did not end in 10 minutes:\n{out}")

    p = _run(sweep + ["encoder=vicreg,dino"], stack, tmp_path, 600)
    assert "launch/status.py" in p.stdout, p.stdout
    jobs = by_encoder(record()["jobs"])
    assert set(jobs) == {"encoder=vicreg", "encoder=dino"}, jobs
    client = MlflowClient(stack["MLFLOW_TRACKING_URI"])
    parent_id = record()["parent_run_id"]
    assert client.get_run(parent_id).info.status == "RUNNING"
    # the controller's queue, not the accounting: slurmdbd may not have recorded a job seconds after its submission
    queue = subprocess.run(["squeue", "-h", "-j", ",".join(jobs.values()), "-o", "%i|%T"], env=stack,
                           capture_output=True, text=True, timeout=60).stdout
    states = dict(line.split("|")[:2] for line in queue.splitlines() if "|" in line)
    assert any(s in ACTIVE_STATES for s in states.values()), f"the launcher waited for its jobs: {states}"
    # cancelled at once: a job of 10 steps and a 4-image evaluation ends within a minute of its submission
    subprocess.run(["scancel", jobs["encoder=dino"]], env=stack, check=True, timeout=60)
    first = _run(status, stack, tmp_path, 300).stdout
    assert "stays RUNNING" in first or " ended " in first, first

    out = status_until_ended()
    assert "ended FAILED" in out, out
    assert client.get_run(parent_id).info.status == "FAILED"
    children = {r.data.tags["encoder"]: r for r in client.search_runs(
        [client.get_run(parent_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")}
    assert children["vicreg"].info.status == "FINISHED"
    assert "dino" not in children or children["dino"].info.status in ("FAILED", "KILLED")  # never RUNNING

    # the cancelled job launched again: same parent run, reopened; both of its submissions stay recorded (status
    # follows every job that may still run), and one that completed is enough for the sweep to finish
    _run(sweep + ["encoder=dino"], stack, tmp_path, 600)
    again = record()
    assert again["parent_run_id"] == parent_id and again["ended"] is None
    assert [j["slurm_job_id"] for j in again["jobs"]][:2] == [jobs["encoder=vicreg"], jobs["encoder=dino"]]
    assert by_encoder(again["jobs"])["encoder=dino"] != jobs["encoder=dino"] and len(again["jobs"]) == 3
    out = status_until_ended()
    assert "ended FINISHED" in out and "3/3 jobs ended" in out, out
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert "report" in out and (tmp_path / "reports" / experiment / "main" / "report.html").exists(), out
    assert "ended FINISHED" in _run(status, stack, tmp_path, 300).stdout  # idempotent once ended
