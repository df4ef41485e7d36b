"""Where encoder weights come from: torch.hub's cache, a download, or a file the user names."""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from rcdm import safe_load
from rcdm.errors import UserError

log = logging.getLogger(__name__)


def hub_cache_path(url_or_name: str) -> Path:
    """``$TORCH_HOME/hub/checkpoints/<file name of the URL>``: where torch.hub keeps downloads."""
    name = os.path.basename(urlparse(url_or_name).path) or url_or_name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def sha256sum(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, download: bool = True, sha256: str | None = None) -> Path:
    """The local copy of ``url`` in the hub cache, downloading it there if allowed and missing.

    Raises a ``UserError`` naming the URL and the path to place the file at when it cannot be had.
    """
    path = hub_cache_path(url)
    if not path.exists():
        if not download:
            raise UserError(f"weights not found at {path}; download {url} and place it there "
                            f"(or allow downloads)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".part{os.getpid()}")
        try:
            log.info("downloading %s to %s", url, path)
            torch.hub.download_url_to_file(url, str(tmp), progress=True)
            os.replace(tmp, path)  # never leave a truncated file under the final name
        except Exception as e:  # noqa: BLE001 - any network or disk failure means the same to the user
            tmp.unlink(missing_ok=True)
            raise UserError(f"could not download {url} ({e.__class__.__name__}: {e}); offline? "
                            f"download it elsewhere and place it at {path}") from e
    if sha256 is not None and sha256sum(path) != sha256:
        raise UserError(f"{path} does not match the sha256 of {url}; delete it and download it again")
    return path


def load_file(path: str | Path) -> dict:
    """A weights file on CPU, read with weights_only=True (rcdm.safe_load): nothing in it is unpickled
    beyond tensors, plain containers and the data types released files need."""
    return safe_load.load(path)


@dataclass(frozen=True)
class WeightsRecord:
    """Which weights an encoder ran with, as manifests and checkpoints record them.

    ``kind``: "released" (the method's published file, or for arch tiny the encoder that ships with
    rcdm), "random" (initialised from ``seed``) or "file" (``path``: a file or URL in the release layout).
    ``sha256`` identifies the weights whatever their kind (a state digest for random ones).
    """

    kind: str
    sha256: str | None = None
    seed: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.kind == "random":
            return f"random (seed {self.seed})"
        return f"{self.kind} ({self.path})" if self.path else self.kind

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_recorded(cls, recorded: str | dict, encoder: str, sha256: str | None = None) -> WeightsRecord:
        """A record as written now (a dict), or as rcdm 0.1 wrote it: one string beside a separate sha256
        ("random (seed N)", "released tiny (...)", or the weights file's path)."""
        if isinstance(recorded, dict):
            return cls(**recorded)
        m = re.fullmatch(r"random \(seed (\d+)\)", recorded)
        if m:
            return cls("random", sha256, seed=int(m[1]))
        if recorded.startswith("released tiny"):
            return cls("released", sha256)
        path = Path(recorded)
        if "://" not in recorded and not path.exists():
            from rcdm.encoders.zoo import encoder_spec  # the registry imports this module

            released_url = encoder_spec(encoder).url
            if released_url and path.name == Path(urlparse(released_url).path).name:
                return cls("released", sha256)  # the published file, cached elsewhere on the writer's machine
            if path.parent.name == "tiny_weights" and path.name == f"{encoder}.pt":
                return cls("released", sha256)  # the tiny encoder shipped with rcdm, installed elsewhere
        return cls("file", sha256, path=recorded)
