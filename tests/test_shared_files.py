"""A file from someone else (a checkpoint, a run folder) is trusted for its tensors only: it cannot make rcdm
fetch a URL of its choosing, plant a file where another loader would unpickle it, or make checkpoint
housekeeping delete anything but rcdm's own checkpoint files. The payloads write a marker file when they run;
the marker must never appear."""
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from rcdm import train_checkpoints
from rcdm.encoders import EncoderCard, WeightsRecord, build_encoder, build_recorded_encoder
from rcdm.encoders.weights import fetch, hub_cache_path, url_cache_name
from rcdm.errors import UserError
from rcdm.presets import build_unet

ROOT = Path(__file__).resolve().parents[1]
INCEPTION_NAME = "weights-inception-2015-12-05-6726825d.pth"


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def file_server(tmp_path):
    """(base URL, folder it serves, list of requested paths): an HTTP server on 127.0.0.1."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(folder), **k)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder, requests
    finally:
        server.shutdown()
        server.server_close()


def _run_with_encoder_url(tmp_path: Path, url: str) -> Path:
    """A run folder whose checkpoint says its tiny DINO weights come from ``url``."""
    model = build_unet("tiny", 128, out_channels=3)
    run = tmp_path / "run"
    meta = {"preset": "tiny", "embed_dim": 128, "image_size": 32, "encoder": "dino", "level": "backbone",
            "encoder_arch": "tiny", "encoder_weights": WeightsRecord("file", path=url).to_dict(),
            "preprocess": {"size": 32, "crop": "center", "normalize": "minus_one_one"},
            "process": {"schedule": "cosine", "num_steps": 1000, "prediction": "v", "learn_sigma": False},
            "unet": {"out_channels": 3, "normalize_embeddings": False, "null_embedding": False}}
    sd = model.state_dict()
    train_checkpoints.save(str(run), {"step": 1, "model": sd, "ema": sd, "optimizer": {}, "meta": meta})
    return run


@pytest.mark.parametrize("name", [INCEPTION_NAME, "evil.pth"])
def test_a_checkpoint_naming_any_url_is_refused_before_anything_is_fetched(tmp_path, file_server, name):
    base, served, requests = file_server
    marker = tmp_path / "ran"
    torch.save({"payload": RunsCode(marker)}, served / name)  # INCEPTION_NAME: torch-fidelity's cache name
    url = f"{base}/{name}"
    run = _run_with_encoder_url(tmp_path, url)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    cmd = [sys.executable, str(ROOT / "launch" / "sample.py"), f"checkpoint={run}", f"images={tmp_path / 'a.png'}",
           "device=cpu", "num_samples=1", "steps=ddim2", f"output={tmp_path / 'g.png'}"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not the registry's URL for dino" in r.stderr and "allow_url=" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not requests and not (tmp_path / "torch").exists()

    # named explicitly, the URL is fetched, but under a name of rcdm's choosing, and checked: a name publishing a
    # sha256 prefix must match it, and the file is read with weights_only: the payload is refused unrun
    r = subprocess.run([*cmd, f"allow_url={url}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    why = "failed its checksum" if name == INCEPTION_NAME else "holds posix.system, which rcdm does not unpickle"
    assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert requests == [f"/{name}"] and not marker.exists()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert sorted(p.name for p in cache.iterdir()) == ([] if name == INCEPTION_NAME else [url_cache_name(url)])


def test_a_poisoned_inception_file_in_the_cache_never_reaches_torch_fidelity(tmp_path, monkeypatch):
    from rcdm.analysis.fidelity import InceptionFeatures

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "ran"
    path = hub_cache_path(INCEPTION_NAME)
    path.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(2), "payload": RunsCode(marker)}, path)
    with pytest.raises(UserError, match="sha256"):  # its name publishes a sha256 prefix this file does not have
        InceptionFeatures(torch.device("cpu"), download=False)
    monkeypatch.setattr("rcdm.analysis.fidelity.fetch", lambda *a, **k: path)  # even past the checksum:
    with pytest.raises(UserError, match="posix.system"):  # read with weights_only, refused
        InceptionFeatures(torch.device("cpu"), download=False)
    assert not marker.exists()


def test_torch_fidelity_is_handed_the_cached_tensors(tmp_path, monkeypatch):
    """The Inception weights reach torch-fidelity as a copy rcdm wrote from tensors, and load unchanged."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from rcdm.analysis.fidelity import InceptionFeatures

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as m:  # a randomly initialised extractor, for its tensors' names and shapes
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        state = {k: torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path=str(empty))
                 .state_dict().items()}
    cached = tmp_path / INCEPTION_NAME
    torch.save(state, cached)
    monkeypatch.setattr("rcdm.analysis.fidelity.fetch", lambda *a, **k: cached)
    net = InceptionFeatures(torch.device("cpu"), download=False).net
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_downloads_are_checked_before_they_take_their_name(tmp_path, monkeypatch, file_server):
    base, served, requests = file_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (served / "w.pth").write_bytes(b"not the weights")
    with pytest.raises(UserError, match="failed its checksum"):
        fetch(f"{base}/w.pth", sha256="0" * 64, name="w.pth")
    assert not any((tmp_path / "torch").rglob("*.pth*"))  # nothing kept, not even the partial file
    # a URL typed by the user (sharding's encoder_weights=<url>) is cached under rcdm's name, never the URL's
    shutil.copy(ROOT / "rcdm" / "encoders" / "tiny_weights" / "dino.pt", served / "resnet50_fullckpt.pth")
    url = f"{base}/resnet50_fullckpt.pth"  # VICReg's released file name
    enc = build_encoder("dino", "tiny", url)
    assert Path(enc.weights.path).name == url_cache_name(url) and not hub_cache_path(url).exists()
    # and a record may name it only through allow_url
    rec = WeightsRecord("file", enc.weights.sha256, path=url)
    with pytest.raises(UserError, match="not the registry's URL"):
        build_recorded_encoder(EncoderCard("dino", "tiny", "backbone", rec))
    assert build_recorded_encoder(EncoderCard("dino", "tiny", "backbone", rec), allow_url=rec.path).weights.sha256 == rec.sha256


@pytest.mark.parametrize("entry", ["../../victim.txt", "/ABS/victim.txt", "ckpt-000000001.pt/../../victim.txt",
                                   "other.pt"])
def test_checkpoint_housekeeping_deletes_only_its_own_checkpoint_files(tmp_path, entry):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run = tmp_path / "sweep" / "job"
    ckpt = run / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "other.pt").write_text("not a checkpoint")
    entry = entry.replace("/ABS", str(tmp_path))
    (ckpt / "latest.json").write_text(f'{{"file": "ckpt-000000001.pt", "step": 1, "history": ["{entry}", '
                                      f'"ckpt-000000001.pt"]}}')
    state = {"model": {"w": torch.zeros(1)}}
    with pytest.raises(UserError, match="not a checkpoint file of that folder"):
        train_checkpoints.save(str(run), {"step": 2, **state}, keep=1)
    with pytest.raises(UserError, match="not a checkpoint file of that folder"):
        train_checkpoints.latest_path(str(run))
    assert victim.read_text() == "keep me" and (ckpt / "other.pt").exists()


def test_checkpoint_housekeeping_keeps_the_newest(tmp_path):
    run = tmp_path / "job"
    for step in (1, 2, 3):
        train_checkpoints.save(str(run), {"step": step, "model": {"w": torch.zeros(1)}}, keep=2)
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["ckpt-000000002.pt", "ckpt-000000003.pt"]
    assert train_checkpoints.latest_path(str(run)).endswith("ckpt-000000003.pt")
