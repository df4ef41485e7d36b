"""launch/fetch_weights.py: every weight file a sweep needs, put in the torch.hub cache once and checked against
the sha256 its dataset's manifest records; offline, one error naming the URL and where to place the file."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fetch(args, torch_home, cwd):
    env = {"PATH": "/usr/bin:/bin", "TORCH_HOME": str(torch_home), "HOME": str(cwd)}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "fetch_weights.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_demo_needs_nothing_from_the_internet(tmp_path):
    p = _fetch(["-m", "encoder=vicreg,dino", "level=backbone,projector"], tmp_path / "th", tmp_path)
    assert p.returncode == 0, p.stderr
    assert "vicreg tiny: ships with rcdm" in p.stdout and "nothing to fetch" in p.stdout


def test_released_weights_are_checked_against_the_manifest_and_refused_when_altered(tmp_path, dataset):
    from rcdm.encoders.weights import hub_cache_path, sha256sum
    from rcdm.encoders.zoo import encoder_spec

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    torch_home = tmp_path / "th"
    url = encoder_spec("dino").url
    cached = torch_home / "hub" / "checkpoints" / hub_cache_path(url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"the released dino file, as the manifest recorded it")
    manifest = json.loads((data / "manifest.json").read_text())  # as a dataset embedded with the released ResNet-50
    manifest["encoders"]["dino"].update(arch="resnet50", weights={"kind": "released", "path": None, "seed": None,
                                                                  "sha256": sha256sum(cached)})
    (data / "manifest.json").write_text(json.dumps(manifest))
    args = ["-m", "encoder=dino", "level=backbone,projector", "data=shards", f"data.url={data}",
            "fidelity.features=inception", "fetch.download=false"]

    p = _fetch(args, torch_home, tmp_path)  # the Inception weights are missing: named, with where to put them
    assert p.returncode == 2 and p.stderr.count("error:") == 1, p.stderr
    assert "weights-inception-2015-12-05-6726825d.pth" in p.stderr and str(torch_home) in p.stderr

    p = _fetch(args[:-2], torch_home, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "dino resnet50" in p.stdout and "present" in p.stdout and "sha256 (manifest)" in p.stdout

    cached.write_bytes(b"something else")
    p = _fetch(args[:-2], torch_home, tmp_path)
    assert p.returncode == 2 and "not the" in p.stderr and "expected" in p.stderr, p.stderr
