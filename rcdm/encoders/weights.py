"""Where encoder weights come from: torch.hub's cache, a download, or a file the user names."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch

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
    """torch.load on CPU; tensors-only first, full unpickling only for files with other objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"no such checkpoint file: {path}") from None
    except Exception:  # noqa: BLE001 - VISSL files pickle config objects; these come from the release URLs
        log.warning("%s holds more than tensors; loading it with full unpickling", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read {path} as a PyTorch checkpoint ({e.__class__.__name__}: {e}); "
                        f"the file is damaged or not a checkpoint: download it again") from e
