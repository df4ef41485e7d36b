"""Real servers on 127.0.0.1 (an S3 API by moto; the helpers an MLflow server needs), started in their own process
group and always stopped: what the tests and benchmarks/scale.py run against, nothing leaving the machine."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError as e:
            if getattr(e, "code", None):  # an HTTP error status still means it is up
                return
            time.sleep(0.3)
    raise TimeoutError(f"no answer from {url} within {timeout} s")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group (servers spawn children), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def moto_s3(log_path) -> Iterator[str]:
    """An S3-API server (moto) on 127.0.0.1; yields its endpoint URL."""
    exe = shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not found: pip install 'moto[server]' (the test extra installs it)")
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(endpoint, proc)
        yield endpoint
    finally:
        stop_group(proc)
