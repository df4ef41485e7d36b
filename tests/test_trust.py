"""Nothing rcdm loads can run code: every torch.load is weights_only, a file that would need more is
refused with a one-line error saying what it holds, and the payload never runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from release_files import WRITERS

from rcdm import train_checkpoints
from rcdm.encoders.weights import load_file
from rcdm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious(path: Path, marker: Path, **extra) -> Path:
    torch.save({"model": {"w": torch.zeros(2)}, "payload": RunsCode(marker), **extra}, path)
    return path


def test_weights_that_would_run_code_are_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = _malicious(tmp_path / "weights.pth", marker)
    with pytest.raises(UserError, match=r"holds posix\.system, which rcdm does not unpickle") as e:
        load_file(path)
    assert "\n" not in str(e.value) and not marker.exists()


def test_a_training_checkpoint_that_would_run_code_is_refused_by_sample_py(tmp_path):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _malicious(run / "checkpoints" / "ckpt-000000010.pt", marker, format="rcdm", step=10)
    (run / "checkpoints" / "latest.json").write_text('{"file": "ckpt-000000010.pt", "step": 10, "history": []}')
    with pytest.raises(UserError, match="posix.system"):
        train_checkpoints.load(train_checkpoints.latest_path(str(run)))
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), f"checkpoint={run}",
                        f"images={tmp_path / 'a.png'}", "device=cpu", "download=false"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "holds posix.system, which rcdm does not unpickle" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not marker.exists()


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_released_layout_loads_without_unpickling(tmp_path, name):
    """The fakes carry what the releases carry (DINO's argparse.Namespace, VISSL's nesting): all allowed by
    name, nothing else."""
    path = tmp_path / f"{name}.pth"
    WRITERS[name](path, "tiny")
    state = load_file(path)
    assert isinstance(state, dict) and state


def test_no_credential_reaches_mlflow_the_logs_or_the_store(tmp_path, dataset, s3_bucket):
    """A job with AWS credentials and an MLflow token in its environment and an endpoint URL carrying
    KEY:SECRET: none of those values appears in the tracking store (params, tags, metric names, artifacts),
    in any file the job wrote (logs, Hydra's configs, the report, the MLflow database), in the checkpoints on
    the object store, or on its console."""
    endpoint, _, fs = s3_bucket
    url_key, url_secret = "AKIDURLUSER0001", "url-s3cr3t-9f8e7d"
    env_values = {"AWS_ACCESS_KEY_ID": "AKIDENVKEY0002", "AWS_SECRET_ACCESS_KEY": "env-s3cr3t-1a2b3c",
                  "AWS_SESSION_TOKEN": "env-session-4d5e6f", "MLFLOW_TRACKING_TOKEN": "mlflow-t0ken-7a8b9c"}
    secrets = [url_key, url_secret, *env_values.values()]
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with_creds = endpoint.replace("http://", f"http://{url_key}:{url_secret}@")
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "-m", "encoder=dino", "level=backbone",
                        "data=shards", f"data.url={dataset}", "storage=s3", "storage.run_root=s3://bucket/runs",
                        f"storage.endpoint_url={with_creds}", f"tracking.uri={uri}", "train.steps=4",
                        "train.batch_size=8", "train.log_every=2", "train.checkpoint_every=2", "train.sample_every=4",
                        "train.loader_workers=0", "grid.images=2", "grid.samples=1", "grid.steps=ddim2",
                        "faithfulness.steps=ddim2"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, **env_values})
    assert r.returncode == 0, r.stderr[-3000:]
    assert fs.ls("bucket/runs/rcdm-demo/main/dino-backbone-tiny/checkpoints")  # it really used the store

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    seen = [("stdout", r.stdout), ("stderr", r.stderr)]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 2
    for run in runs:
        seen += [(f"param {k}", v) for k, v in run.data.params.items()]
        seen += [(f"tag {k}", v) for k, v in run.data.tags.items()] + [("metric name", k) for k in run.data.metrics]
        if run.data.tags.get("kind") != "sweep":  # the job's run: the endpoint masked, not dropped
            assert run.data.params["storage.endpoint_url"] == endpoint.replace("http://", "http://***@")
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl" / run.info.run_id)))
        seen += [(f"artifact {p}", p.read_bytes().decode("latin-1")) for p in local.rglob("*") if p.is_file()]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "moto" not in p.name]
    assert any(p.suffix == ".log" for p in written) and any(p.name == "overrides.yaml" for p in written)
    seen += [(str(p), p.read_bytes().decode("latin-1")) for p in written]
    seen += [(p, fs.cat(p).decode("latin-1")) for p in fs.find("bucket/runs")]
    for secret in secrets:
        leaks = [(where, s[max(0, s.find(secret) - 80):s.find(secret) + 40]) for where, s in seen if secret in s]
        assert not leaks, (secret, leaks[:3])
