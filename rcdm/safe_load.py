"""Every file rcdm reads with ``torch.load`` goes through here: ``weights_only=True`` always, so loading a
checkpoint never runs code that the file names. Tensors and plain containers load as they are; the few
data-only types that released checkpoints hold are allowed by name (``SAFE_GLOBALS``); a file that needs
anything else is refused with a one-line error listing what it contains."""
from __future__ import annotations

import argparse
import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from rcdm.errors import UserError


def _numpy_data_types() -> list:
    """What numpy arrays and scalars pickle as (VISSL checkpoints keep numpy numbers in their training state)."""
    core = getattr(np, "_core", None) or np.core
    types = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    types += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                          "uint8", "uint16", "uint32", "uint64", "bool")]
    return types


# data only: an attribute bag (DINO pickles its argparse arguments as ``args``) and numpy arrays/scalars
SAFE_GLOBALS = [argparse.Namespace, *_numpy_data_types()]


def load(source: str | Path | bytes | BinaryIO, what: str | None = None) -> Any:
    """``torch.load(source, weights_only=True)`` on CPU with ``SAFE_GLOBALS`` allowed. ``what`` names the
    file in errors (default: the path)."""
    name = what or str(source if isinstance(source, (str, Path)) else "the file")
    data = source if not isinstance(source, bytes) else io.BytesIO(source)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(data, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"no such checkpoint file: {name}") from None
    except pickle.UnpicklingError as e:
        if hasattr(data, "seek"):
            data.seek(0)
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(data)
        except Exception:  # noqa: BLE001 - an old-format file: torch's own message names the global
            found = [str(e).strip().splitlines()[-3] if str(e).strip() else "unknown objects"]
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
        found = [g for g in found if g not in allowed] or found
        raise UserError(f"{name} holds {', '.join(found)}, which rcdm does not unpickle (loading could run code "
                        f"the file names); use a file of tensors and plain containers") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a zip/pickle, ...
        raise UserError(f"cannot read {name} as a PyTorch checkpoint ({e.__class__.__name__}: {e}); the file is "
                        f"damaged or not a checkpoint: download or write it again") from e
