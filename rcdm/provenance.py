"""Which code made a thing: recorded in every dataset manifest and on every MLflow run (tag ``code_version``),
so a sweep report can say whether its runs share one version."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import rcdm

REPO = Path(rcdm.__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``rcdm <version> (<git commit>)``, with ``+dirty`` when tracked files differ from the commit, for a
    source checkout; ``rcdm <version>`` for an installed wheel or where git is missing."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return f"rcdm {rcdm.__version__}"
    return f"rcdm {rcdm.__version__} ({commit}{'+dirty' if dirty else ''})"
