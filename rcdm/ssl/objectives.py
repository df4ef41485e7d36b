"""The four SSL objectives, each as its paper defines it (hyper-parameters come from the configs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_w: float = 25.0, var_w: float = 25.0, cov_w: float = 1.0
                ) -> tuple[torch.Tensor, dict]:
    """VICReg (Bardes et al. 2022): invariance (MSE), variance (hinge on each dim's std), covariance
    (squared off-diagonal covariances). z: [N, D]."""
    n, d = z1.shape
    inv = F.mse_loss(z1, z2)
    z1, z2 = z1 - z1.mean(0), z2 - z2.mean(0)
    std1, std2 = torch.sqrt(z1.var(0) + 1e-4), torch.sqrt(z2.var(0) + 1e-4)
    var = (F.relu(1 - std1).mean() + F.relu(1 - std2).mean()) / 2
    cov1, cov2 = (z1.T @ z1) / (n - 1), (z2.T @ z2) / (n - 1)
    cov = _off_diagonal(cov1).pow(2).sum() / d + _off_diagonal(cov2).pow(2).sum() / d
    return sim_w * inv + var_w * var + cov_w * cov, {"invariance": inv.item(), "variance": var.item(),
                                                      "covariance": cov.item()}


def barlow_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> tuple[torch.Tensor, dict]:
    """Barlow Twins (Zbontar et al. 2021): the cross-correlation of the batch-standardised
    embeddings pushed to the identity; ``lambd`` weighs the off-diagonal terms."""
    n = z1.shape[0]
    z1 = (z1 - z1.mean(0)) / (z1.std(0) + 1e-6)
    z2 = (z2 - z2.mean(0)) / (z2.std(0) + 1e-6)
    c = z1.T @ z2 / n  # [D, D]
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = _off_diagonal(c).pow(2).sum()
    return on + lambd * off, {"on_diagonal": on.item(), "off_diagonal": off.item()}


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, dict]:
    """SimCLR's NT-Xent (Chen et al. 2020): each view's positive is the other view of its image, the
    2N - 2 other views of the batch are its negatives; cosine similarity over ``temperature``."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # [2N, D]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is not its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    loss = F.cross_entropy(logits, targets)
    acc = (logits.argmax(1) == targets).float().mean()
    return loss, {"positive_top1": acc.item()}


class DINOHead(nn.Module):
    """DINO's head after the projector MLP: L2 normalisation then a weight-normalised linear layer onto
    ``prototypes`` outputs with its norm fixed to 1 (``head.last_layer`` in the release)."""

    def __init__(self, dim: int, prototypes: int):
        super().__init__()
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(dim, prototypes, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(z, dim=-1))


class DINOLoss(nn.Module):
    """DINO (Caron et al. 2021): cross-entropy between the sharpened, centred teacher distribution on the
    global views and the student's on every other view; the centre is an EMA of teacher outputs."""

    def __init__(self, prototypes: int, student_temp: float, center_momentum: float):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, prototypes))

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], teacher_temp: float
                ) -> tuple[torch.Tensor, dict]:
        t_probs = [F.softmax((t - self.center) / teacher_temp, dim=-1).detach() for t in teacher]
        s_logp = [F.log_softmax(s / self.student_temp, dim=-1) for s in student]
        total, terms = 0.0, 0
        for i, tp in enumerate(t_probs):
            for j, sl in enumerate(s_logp):
                if i == j:  # the same global view
                    continue
                total = total + (-tp * sl).sum(-1).mean()
                terms += 1
        with torch.no_grad():
            batch_center = torch.cat(teacher).mean(0, keepdim=True)
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
            entropy = -(t_probs[0] * torch.log(t_probs[0] + 1e-12)).sum(-1).mean()
        return total / terms, {"teacher_entropy": entropy.item()}
