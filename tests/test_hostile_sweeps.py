"""Reliability, round two, the sweep's own records: status and the submission record, plan, fetch and the lease,
tried as an attacker with write access to a shared folder or tracking server and as a careless user would.
Each case ends in one clear error or the documented behaviour: no run is ended by a record it does not own, no
download is kept half-written, no password reaches the console. (Run folders, export, report, model cards:
tests/test_hostile_runs.py.)"""
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rcdm.errors import UserError
from rcdm.lease import LEASE, Lease
from rcdm.storage import open_fs, write_json

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2", "train.sample_every=2",
         "train.loader_workers=0", "grid.images=2", "grid.samples=1", "grid.steps=ddim2", "faithfulness.images=0",
         "invariance.images=0", "diagnostic.images=0"]


def runs(tmp_path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


# ---- status and the submission record -----------------------------------------------------------------------------

def _submitted_sweep(typed, tmp_path, jobs, parent_tags=None, record_parent=True):
    """A sweep as ``cluster.wait=false`` leaves it: parent run (RUNNING), parent_run.json, submitted.json."""
    from pipeline.submitted import SubmittedJob, record_submission
    from rcdm.tracking import Tracker

    cfg = typed("sweep", [f"storage.run_root={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    parent = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    parent.start(None, "sweep main", parent_tags or {"kind": "sweep", "sweep_id": cfg.sweep_id})
    fs, _ = open_fs(cfg.parent_run_file)
    write_json(fs, cfg.parent_run_file, {"run_id": parent.run_id})
    for i, j in enumerate(jobs):
        record_submission(cfg.submitted_file, cfg.sweep_id, parent.run_id if record_parent else "another0run",
                          [SubmittedJob(j, ("encoder=vicreg",), "t")])
    return cfg, parent


def test_status_never_ends_a_run_its_record_does_not_own(typed, tmp_path, monkeypatch):
    from pipeline import reconcile
    from rcdm.tracking import Tracker

    other = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "another-experiment")
    other.start(None, "someone's run", {})
    cfg, parent = _submitted_sweep(typed, tmp_path, ["11"])
    rec = json.loads(Path(cfg.submitted_file).read_text())
    Path(cfg.submitted_file).write_text(json.dumps({**rec, "parent_run_id": other.run_id}))
    monkeypatch.setattr(reconcile, "sacct_states", lambda ids: {i: "COMPLETED" for i in ids})
    with pytest.raises(UserError, match="not this sweep's parent run"):
        reconcile.reconcile(cfg)
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_run(other.run_id).info.status == "RUNNING"
    assert client.get_run(parent.run_id).info.status == "RUNNING"


def test_a_second_submission_keeps_the_first_jobs_followed(typed, tmp_path, monkeypatch):
    """The same sweep submitted twice without waiting: both submissions stay recorded, and the parent stays
    RUNNING while the first's jobs still train."""
    from pipeline import reconcile

    cfg, parent = _submitted_sweep(typed, tmp_path, ["11", "12"])
    assert [j["slurm_job_id"] for j in json.loads(Path(cfg.submitted_file).read_text())["jobs"]] == ["11", "12"]
    monkeypatch.setattr(reconcile, "sacct_states", lambda ids: {"11": "RUNNING", "12": "FAILED"})
    record = reconcile.reconcile(cfg)
    assert not record["ended"] and MlflowClient(cfg.tracking.uri).get_run(parent.run_id).info.status == "RUNNING"
    monkeypatch.setattr(reconcile, "sacct_states", lambda ids: {"11": "COMPLETED", "12": "FAILED"})
    monkeypatch.setattr("pipeline.stages.report_sweep", lambda *a, **k: None)
    record = reconcile.reconcile(cfg)
    assert record["ended"]["status"] == "FAILED"  # no run of the job finished in MLflow


@pytest.mark.parametrize("body, message", [({"sweep_id": "main", "jobs": [{"slurm_job_id": 5}]}, "slurm_job_id"),
                                           ({"sweep_id": "main", "jobs": "x"}, "jobs is not a list"),
                                           ("[1, 2]", "not a JSON object"),
                                           ({"sweep_id": "main", "parent_run_id": None, "jobs": []}, "records no")])
def test_a_malformed_submission_record_is_one_error(typed, tmp_path, body, message):
    from pipeline import reconcile

    cfg, _ = _submitted_sweep(typed, tmp_path, [])
    Path(cfg.submitted_file).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.submitted_file).write_text(body if isinstance(body, str) else json.dumps(body))
    with pytest.raises(UserError, match=message):
        reconcile.reconcile(cfg)


def test_the_launcher_records_its_jobs_whatever_the_old_record_holds(tmp_path):
    from pipeline.submitted import SubmittedJob, read_submitted, record_submission

    path = tmp_path / "submitted.json"
    path.write_text('{"jobs": 7}')
    record_submission(str(path), "main", None, [SubmittedJob("42", ("encoder=dino",), "t")])
    assert [j.slurm_job_id for j in read_submitted(str(path)).jobs] == ["42"]
    assert [p.read_text() for p in tmp_path.glob("submitted.json.unreadable-*")] == ['{"jobs": 7}']


def test_sacct_is_asked_in_batches_and_status_prints_no_terminal_escapes(tmp_path, monkeypatch):
    from pipeline import reconcile

    calls = tmp_path / "calls"
    sacct = tmp_path / "bin" / "sacct"
    sacct.parent.mkdir()
    sacct.write_text(f'#!/bin/sh\necho "$5" | tr , "\\n" | wc -l >> {calls}\n'
                     'for id in $(echo "$5" | tr , " "); do echo "$id|COMPLETED"; done\n')
    sacct.chmod(0o755)
    monkeypatch.setenv("PATH", f"{sacct.parent}:{os.environ['PATH']}")
    states = reconcile.sacct_states([str(i) for i in range(2500)])
    assert len(states) == 2500 and [int(x) for x in calls.read_text().split()] == [1000, 1000, 500]
    jobs = [reconcile.JobState("1", ["encoder=\x1b[2J\x1b]0;pwned\x07dino"], "UNKNOWN")]
    text = reconcile.format_status({"jobs": jobs, "sweep_id": "main", "submitted_at": "t", "parent_run_id": "p",
                                 "ended": None})
    assert "\x1b" not in text and "\\x1b[2J" in text and "unknown to SLURM's accounting" in text


def test_an_array_task_cancelled_while_pending_ends_and_a_started_one_keeps_its_own_state(tmp_path, monkeypatch):
    """What slurm-wlm's accounting printed for a 4-task array (%1) with task 2 cancelled while pending: no record for
    5_2 at all, and a pending record that still lists 5_1 after 5_1 started. Before, 5_2 stayed UNKNOWN forever
    and the sweep never ended (CI, stop 44)."""
    from pipeline import reconcile

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (tmp_path / "accounting").write_text("5_0|COMPLETED\n5_[1,3%1]|PENDING\n5_1|RUNNING\n")
    (bin_ / "sacct").write_text(f'#!/bin/sh\ncase "$5" in *5*) cat {tmp_path / "accounting"};; esac\n')
    (bin_ / "squeue").write_text('#!/bin/sh\necho "$4" >> %s\n' % (tmp_path / "asked"))
    for f in bin_.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    states = reconcile.sacct_states(["5_0", "5_1", "5_2", "5_3", "9_0"])
    assert states == {"5_0": "COMPLETED", "5_1": "RUNNING", "5_2": "CANCELLED", "5_3": "PENDING"}
    assert (tmp_path / "asked").read_text().split() == ["5_2"]  # the controller is asked before concluding
    (bin_ / "squeue").write_text('#!/bin/sh\necho "5_2|PENDING"\n')  # still queued: not concluded
    assert "5_2" not in reconcile.sacct_states(["5_2"])
    (bin_ / "squeue").write_text("#!/bin/sh\nexit 1\n")  # the controller did not answer: nothing concluded
    assert "5_2" not in reconcile.sacct_states(["5_2"])


def test_no_password_reaches_the_console_from_status_or_the_report_warning(typed, tmp_path, capsys, monkeypatch):
    from pipeline.stages import report_sweep
    from rcdm.config import TrackingConfig

    secret = "hunter2pass"
    cfg, _ = _submitted_sweep(typed, tmp_path, ["11"])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the server is down: fail at once, not in minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    env = dict(os.environ)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    p = subprocess.run([sys.executable, str(ROOT / "launch" / "status.py"), f"storage.run_root={tmp_path / 'runs'}",
                        f"tracking.uri=http://user:{secret}@127.0.0.1:{port}"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp_path)
    assert p.returncode != 0 and secret not in p.stdout + p.stderr and "error:" in p.stderr, p.stderr
    report_sweep(TrackingConfig(f"http://user:{secret}@127.0.0.1:{port}", "e"), "main", "abc")
    err = capsys.readouterr().err
    assert "the sweep report was not written" in err and secret not in err


# ---- plan ---------------------------------------------------------------------------------------------------------

def test_plan_checks_its_keys_and_names_devices_it_does_not_know():
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import plan as plan_cli
    finally:
        sys.path.remove(str(ROOT / "launch"))
    from rcdm.cost import peak_tflops

    assert peak_tflops("L40") is None and peak_tflops("L40S") == 362.0 and peak_tflops("A10") is None
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("MI300X") is None
    cases = [(["plan.utilisation=0"], "must be a fraction"), (["plan.utilisation=nan"], "must be a fraction"),
             (["plan.utilisation=abc"], "wrong type"), (["plan.device"], "do not compose"),
             (["plan.devices=H100"], "unknown key.*plan.device, plan.utilisation, plan.peak_tflops"),
             (["plan.device=H100,H200"], "takes one value"), (["plan.peak_tflops=-5"], "positive number")]
    for bad, message in cases:
        with pytest.raises(UserError, match=message):
            plan_cli.main(bad)
    with pytest.raises(UserError, match="plan.peak_tflops"):
        plan_cli.main(["model=adm128", "data=shards", "data.url=/nowhere", "cluster=slurm", "plan.device=MI300X"])
    text = plan_cli.main(["model=adm128", "data=shards", "data.url=/nowhere", "cluster=slurm", "plan.device=MI300X",
                          "plan.peak_tflops=1307"])
    assert "1307 TFLOP/s (plan.peak_tflops)" in text


def test_plan_marks_an_s3_dataset_it_cannot_read(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import plan as plan_cli
    finally:
        sys.path.remove(str(ROOT / "launch"))
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = plan_cli.main(["data=shards", "data.url=s3://bucket/data", "storage=s3", "storage.run_root=s3://bucket/r",
                          f"storage.endpoint_url=http://127.0.0.1:{port}"])
    assert "UNREADABLE" in text and "device-hours" in text


# ---- fetch --------------------------------------------------------------------------------------------------------

@pytest.fixture
def odd_server():
    """An HTTP server on 127.0.0.1: /short promises 1000 bytes and sends 10; /silent never answers."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/silent":
                time.sleep(5)
                return
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_truncated_or_stalled_download_is_never_kept(tmp_path, monkeypatch, odd_server):
    from rcdm.encoders import weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(weights, "DOWNLOAD_TIMEOUT_S", 1.0)
    with pytest.raises(UserError, match="stopped at 10 of 1000 bytes"):
        weights.fetch(f"{odd_server}/short", name="short.pth")
    t0 = time.monotonic()
    with pytest.raises(UserError, match="could not download .*timed out"):
        weights.fetch(f"{odd_server}/silent", name="silent.pth")
    assert time.monotonic() - t0 < 4
    assert not [p for p in (tmp_path / "th").rglob("*") if p.is_file()]  # no final name, no .partial


def test_torch_home_as_a_file_and_hydra_spelled_booleans(tmp_path, monkeypatch):
    from rcdm.encoders.weights import fetch

    (tmp_path / "th").write_text("not a folder")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(UserError, match="cannot make the torch.hub cache folder"):
        fetch("http://127.0.0.1:9/w.pth")
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import fetch_weights
    finally:
        sys.path.remove(str(ROOT / "launch"))
    from pipeline.command_line import sweep_command

    configs, opts = sweep_command("fetch", ["fetch.download=False", "encoder=dino"])
    assert opts.download is False and [c.encoder.name for c in configs] == ["dino"]
    assert sweep_command("fetch", ["fetch.download=no"])[1].download is False  # as Hydra reads booleans
    assert sweep_command("fetch", [])[1].download is True
    with pytest.raises(UserError, match="wrong type.*fetch.download"):
        fetch_weights.main(["fetch.download=maybe"])


# ---- the lease ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("forged", ['{"expires": Infinity, "pid": 1}', '{"expires": NaN}', '{"expires": "soon"}',
                                    '{"expires": 1e300, "host": "h"}', '{"expires": %f, "pid": 99999999999}',
                                    '{"expires": %f, "host": 7}'])
def test_a_forged_lease_is_no_lease(tmp_path, forged):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LEASE).write_text(forged.replace("%f", str(time.time() + 600)))
    lease = Lease(str(tmp_path / "run"), ttl_s=60)
    lease.acquire()
    lease.release()
    assert not (tmp_path / "run" / LEASE).exists()


def test_one_launch_wins_a_stale_lease_however_many_race_for_it(tmp_path):
    for trial in range(5):
        run = tmp_path / str(trial)
        run.mkdir()
        (run / LEASE).write_text(json.dumps({"host": "h", "pid": 5, "expires": time.time() - 1}))
        won, errors = [], []

        def launch():
            lease = Lease(str(run), ttl_s=60)
            try:
                lease.acquire()
                won.append(lease)
            except UserError as e:
                errors.append(e)
        threads = [threading.Thread(target=launch) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(errors) == 5
        assert json.loads((run / LEASE).read_text())["token"] == won[0].token
        won[0].release()
        assert not list(run.iterdir())


def test_a_second_sweep_launch_leaves_the_running_sweeps_parent_alone(tmp_path, dataset):
    """A job of the sweep is being trained by another launch (its lease is held by a live process): the second
    launch is refused before it opens anything, and the parent run the first launch opened stays RUNNING."""
    from rcdm.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    sweep_root = tmp_path / "runs" / "rcdm-demo" / "main"
    parent = Tracker(uri, "rcdm-demo")
    parent.start(None, "sweep main", {"kind": "sweep", "sweep_id": "main"})
    sweep_root.mkdir(parents=True)
    (sweep_root / "parent_run.json").write_text(json.dumps({"run_id": parent.run_id}))
    holder = subprocess.Popen(["sleep", "120"])
    try:
        (sweep_root / "dino-backbone-tiny").mkdir()
        (sweep_root / "dino-backbone-tiny" / LEASE).write_text(json.dumps({
            "host": socket.gethostname(), "pid": holder.pid, "slurm_job_id": "", "token": "t",
            "expires": time.time() + 600, "started": "then"}))
        p = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "-m", "encoder=dino", "level=backbone",
                            "data=shards", f"data.url={dataset}", f"storage.run_root={tmp_path / 'runs'}",
                            f"tracking.uri={uri}", *QUICK], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
    assert p.returncode == 2 and "this sweep is running in another launch" in p.stderr, p.stderr
    assert MlflowClient(uri).get_run(parent.run_id).info.status == "RUNNING"
    assert len(runs(tmp_path)) == 1  # no job run was opened
