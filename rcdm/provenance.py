"""Which code trained a run: recorded on every MLflow run (tag ``code_version``) so a sweep report can say
whether its runs share one version."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import rcdm

REPO = Path(rcdm.__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<git commit>`` (``+dirty`` when tracked files differ from it) for a source checkout, else
    ``rcdm <package version>`` (an installed wheel, or no git on the machine)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return f"rcdm {rcdm.__version__}"
    return commit + ("+dirty" if dirty else "")
