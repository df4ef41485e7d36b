"""Where encoder weights come from: torch.hub's cache, a download, or a file the user names."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from rcdm import safe_load
from rcdm.errors import UserError

log = logging.getLogger(__name__)


DOWNLOAD_TIMEOUT_S = 60.0  # a server silent this long fails the download (it would hang a fetch forever)
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[a-z]+$")  # torch.hub's convention: name-<sha256 prefix>.ext


def hub_cache_path(url_or_name: str) -> Path:
    """``$TORCH_HOME/hub/checkpoints/<file name of the URL>``: where torch.hub keeps downloads."""
    name = os.path.basename(urlparse(url_or_name).path) or url_or_name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def url_cache_name(url: str) -> str:
    """The cache name of a file from a URL outside the registries: prefixed with a digest of the whole URL,
    so that it can never take the name of a file another loader trusts (a released file, torch-fidelity's
    Inception weights)."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(urlparse(url).path))[-80:] or "weights"
    return f"rcdm-url-{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


def published_prefix(url: str) -> str | None:
    """The sha256 prefix a URL publishes in its file name (``resnet50-0676ba61.pth``), or None."""
    m = HASH_IN_NAME.search(os.path.basename(urlparse(url).path))
    return m[1] if m else None


def sha256sum(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksum_error(path: Path, url: str, digest: str, sha256: str | None, prefix: str | None) -> str | None:
    if sha256 is not None and digest != sha256:
        return f"{path} has sha256 {digest[:12]}..., not the {sha256[:12]}... expected of {url}"
    if prefix is not None and not digest.startswith(prefix):
        return f"{path} has sha256 {digest[:12]}..., but {url} publishes one starting {prefix}"
    return None


def fetch(url: str, download: bool = True, sha256: str | None = None, name: str | None = None) -> Path:
    """The local copy of ``url`` in the hub cache (as ``name``, default the URL's file name), downloading it
    there if allowed and missing. A download is checked against ``sha256`` and the prefix the URL's name
    publishes before it takes its final name, so the cache never holds a file that failed its checksum.

    Raises a ``UserError`` naming the URL and the path to place the file at when it cannot be had.
    """
    path = hub_cache_path(name or url)
    prefix = published_prefix(url)
    if path.is_dir() or (path.parent.exists() and not path.parent.is_dir()):
        raise UserError(f"the torch.hub cache {path.parent} is not a folder of files (TORCH_HOME="
                        f"{os.environ.get('TORCH_HOME', 'unset')}): point TORCH_HOME at a folder")
    if not path.exists():
        if not download:
            raise UserError(f"weights not found at {path}; download {url} and place it there "
                            f"(or allow downloads)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot make the torch.hub cache folder {path.parent} ({e.strerror}): point TORCH_HOME at "
                            f"a folder you can write to") from None
        log.info("downloading %s to %s", url, path)
        with _downloaded(url, path) as tmp:
            bad = _checksum_error(path, url, sha256sum(tmp), sha256, prefix)
            if bad:
                raise UserError(f"the download failed its checksum: {bad}; nothing was kept")
            os.replace(tmp, path)  # never leave a truncated or unchecked file under the final name
        return path
    if sha256 is not None or prefix is not None:
        bad = _checksum_error(path, url, sha256sum(path), sha256, prefix)
        if bad:
            raise UserError(f"{bad}; delete it and download it again")
    return path


@contextlib.contextmanager
def _downloaded(url: str, path: Path):
    """``url`` downloaded whole into a new private file beside ``path`` (created exclusively, never through a link),
    yielded for checking; removed afterwards unless renamed. A server silent for ``DOWNLOAD_TIMEOUT_S`` or a body
    shorter than its Content-Length is a UserError naming the URL and where to place the file instead."""
    tmp = path.with_name(f".{path.name}.partial-{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r:  # noqa: S310
            total, got = r.headers.get("Content-Length"), 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                got += len(chunk)
            if total is not None and total.isdigit() and got != int(total):
                raise UserError(f"the download of {url} stopped at {got} of {total} bytes; nothing was kept: try "
                                f"again, or download it elsewhere and place it at {path}")
        yield tmp
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any network or disk failure means the same to the user
        raise UserError(f"could not download {url} ({e.__class__.__name__}: {e}); offline? download it elsewhere and "
                        f"place it at {path}") from None
    finally:
        tmp.unlink(missing_ok=True)


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
    def from_dict(cls, d: dict) -> WeightsRecord:
        return cls(**d)
