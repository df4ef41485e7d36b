"""PNG grids of images in the model's range [-1, 1]: every figure rcdm writes goes through here."""
from __future__ import annotations

import io

import torch
from torchvision.utils import save_image


def cells_png(cells: torch.Tensor, nrow: int) -> bytes:
    """PNG bytes of ``cells`` [N, 3, S, S] in [-1, 1], ``nrow`` images a row, 2 px apart."""
    buf = io.BytesIO()
    save_image(cells.detach().float().cpu(), buf, format="png", nrow=nrow, value_range=(-1, 1), normalize=True,
               padding=2)
    return buf.getvalue()


def samples_png(originals: torch.Tensor, samples: torch.Tensor) -> bytes:
    """One row per original [N, 3, S, S]: the original, then its k samples ([N * k, 3, S, S])."""
    n, k = len(originals), len(samples) // len(originals)
    rows = torch.cat([originals.cpu()[:, None], samples.cpu().view(n, k, *samples.shape[1:])], 1)
    return cells_png(rows.flatten(0, 1), k + 1)
