"""A supervised predictor of the synthetic data's generative factors.

Two jobs: it reads the factors off generated samples (the invariance probe: which factors survive
in a sample conditioned on an augmented view), and it is the supervised baseline of the adversarial
probe (the same tiny ResNet trunk the SSL encoders use, trained end to end on labels).

Trained on labelled synthetic images (a split no encoder or RCDM saw) with mild blur and noise, so that
it also reads slightly soft generated images. The default ones (32 px, 600 steps, the reader and the
supervised baseline) ship with rcdm (``rcdm/analysis/readers/``, checked against their sha256): a fresh
machine reads factors at once. Any other is trained on first use (about a minute and a half of a CPU per
600 steps) and cached under ``$RCDM_CACHE`` (default ``~/.cache/rcdm``), keyed by everything that defines it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rcdm import safe_load
from rcdm.encoders.backbones import TinyResNet
from rcdm.probes import factor_labels, synthetic_set
from rcdm.ssl.augment import blur
from rcdm.errors import UserError
from rcdm.storage import write_local
from rcdm.config import READER_STEPS

log = logging.getLogger(__name__)
FACTORS = ("shape", "colour", "background", "scale", "x", "y", "grayscale")
VERSION = 1  # bump when training changes, so stale cache entries are not reused


@dataclass(frozen=True)
class FactorNetConfig:
    image_size: int = 32
    images: int = 4096
    steps: int = READER_STEPS
    batch_size: int = 128
    lr: float = 2e-3
    data_seed: int = 11  # split "factors": images the encoders, RCDMs and probes never saw
    seed: int = 0
    soften: bool = True  # blur + noise: reads generated samples; off for the plain supervised baseline

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class FactorNet(nn.Module):
    """TinyResNet trunk + one linear head per factor. Input: images in [-1, 1]."""

    def __init__(self, classes: dict[str, int]):
        super().__init__()
        self.trunk = TinyResNet()
        self.heads = nn.ModuleDict({k: nn.Linear(self.trunk.out_dim, n) for k, n in classes.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)
        return {k: head(f) for k, head in self.heads.items()}


def _labels(factors: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {k: v for k, v in factor_labels(factors).items() if k in FACTORS}


def _soften(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x in [0, 1]: random blur and pixel noise, the ways generated images differ from rendered ones."""
    x = blur(x, 0.5, (0.1, 1.0), g)
    return (x + torch.randn(x.shape, generator=g) * 0.03 * torch.rand(len(x), 1, 1, 1, generator=g)).clamp(0, 1)


def train_factor_net(cfg: FactorNetConfig) -> tuple[FactorNet, dict]:
    torch.manual_seed(cfg.seed)
    images, factors = synthetic_set(cfg.images, cfg.data_seed, "factors", cfg.image_size)
    labels = _labels(factors)
    net = FactorNet({k: int(y.max()) + 1 for k, (y, _) in labels.items()})
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    net.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        x = images[idx].float() / 255
        x = (_soften(x, g) if cfg.soften else x) * 2 - 1
        out = net(x)
        loss = sum(F.cross_entropy(out[k][m[idx]], y[idx][m[idx]]) for k, (y, m) in labels.items() if m[idx].any())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    test_x, test_f = synthetic_set(1000, cfg.data_seed, "factors-test", cfg.image_size)
    pred = predict(net, test_x.float() / 127.5 - 1)
    accuracy = {k: float((pred[k][m] == y[m]).float().mean()) for k, (y, m) in _labels(test_f).items()}
    report = {"config": asdict(cfg), "version": VERSION, "test_accuracy": accuracy, "final_loss": float(loss.detach())}
    log.info("factor predictor: held-out accuracy %s", {k: round(v, 3) for k, v in accuracy.items()})
    return net, report


def cache_dir() -> Path:
    return Path(os.environ.get("RCDM_CACHE", Path.home() / ".cache" / "rcdm"))


SHIPPED = Path(__file__).parent / "readers"  # the default readers, <key>.pt, and index.json: {key: sha256}


def shipped_reader(key: str) -> Path | None:
    """The packaged reader of config ``key``, after checking its sha256; None where none ships."""
    index = SHIPPED / "index.json"
    digests = json.loads(index.read_text()) if index.exists() else {}
    path = SHIPPED / f"{key}.pt"
    if key not in digests or not path.exists():
        return None
    if hashlib.sha256(path.read_bytes()).hexdigest() != digests[key]:
        raise UserError(f"{path} does not match its sha256 in {index}: restore it with git checkout -- "
                        f"rcdm/analysis/readers")
    return path


def _load(path: Path) -> tuple[FactorNet, dict]:
    state = safe_load.load(path)
    net = FactorNet({k.split(".")[1]: v.shape[0] for k, v in state["model"].items()
                     if k.startswith("heads.") and k.endswith(".bias")})
    net.load_state_dict(state["model"])
    return net.eval(), json.loads(state["report"])


def factor_net(cfg: FactorNetConfig = FactorNetConfig()) -> tuple[FactorNet, dict]:
    """The predictor for ``cfg``: the shipped one, else the cached one, else trained and cached."""
    shipped = shipped_reader(cfg.key())
    if shipped is not None:
        return _load(shipped)
    path = cache_dir() / "factor_net" / f"{cfg.key()}.pt"
    if path.exists():
        return _load(path)
    log.info("training the synthetic-factor predictor once (cached at %s)", path)
    net, report = train_factor_net(cfg)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "report": json.dumps(report)}, buf)
    write_local(path, buf.getvalue())
    return net, report


def synthetic_reader(image_size: int, steps: int = READER_STEPS) -> tuple[FactorNet, dict]:
    """The reader of the demo generator's factors at ``image_size`` (cached once trained) and its report."""
    return factor_net(FactorNetConfig(image_size=image_size, steps=steps))


@torch.no_grad()
def predict(net: FactorNet, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """images [N, 3, S, S] in [-1, 1] -> {factor: predicted class [N]}."""
    device = next(net.parameters()).device
    out: dict[str, list] = {}
    for chunk in images.split(batch_size):
        for k, v in net.eval()(chunk.to(device).float()).items():
            out.setdefault(k, []).append(v.argmax(1).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def true_factors(factors: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """factor -> (class [N], mask [N] where it is defined): the labels the predictor was trained on."""
    return _labels(factors)
