"""Write small random checkpoints in each official release's on-disk layout, as those projects save
them (key prefixes, nesting, extra entries), so loading is tested without any download."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from rcdm.encoders.backbones import ARCHES

WIDE = {"resnet50": 8192, "tiny": 256}


def _trunk(arch: str, seed: int) -> tuple[dict, int]:
    torch.manual_seed(seed)
    trunk, dim = ARCHES[arch]()
    for m in trunk.modules():  # non-trivial BN statistics, so a load that skips them is caught
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in trunk.state_dict().items()}, dim


def _mlp_sd(layers: list[nn.Module]) -> dict:
    return nn.Sequential(*layers).state_dict()


def write_vicreg(path: Path, arch: str, seed: int = 0) -> None:
    # facebookresearch/vicreg main_vicreg.py: torch.save(dict(epoch=..., model=model.state_dict(), optimizer=...))
    trunk, d = _trunk(arch, seed)
    w = WIDE[arch]
    proj = _mlp_sd([nn.Linear(d, w), nn.BatchNorm1d(w), nn.ReLU(), nn.Linear(w, w), nn.BatchNorm1d(w), nn.ReLU(),
                    nn.Linear(w, w, bias=False)])
    model = {f"module.backbone.{k}": v for k, v in trunk.items()} | {f"module.projector.{k}": v for k, v in proj.items()}
    torch.save({"epoch": 1000, "model": model, "optimizer": {"state": {}, "param_groups": []}}, path)


def write_dino(path: Path, arch: str, seed: int = 0) -> None:
    # facebookresearch/dino: save_dict with student, teacher (DDP-wrapped), optimizer, epoch, args, dino_loss
    trunk, d = _trunk(arch, seed)
    hidden, out = (4096, 256) if arch == "resnet50" else (256, 64)
    mlp = _mlp_sd([nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out)])
    last = nn.utils.parametrizations.weight_norm(nn.Linear(out, 1000, bias=False))
    teacher = ({f"module.backbone.{k}": v for k, v in trunk.items()}
               | {f"module.head.mlp.{k}": v for k, v in mlp.items()}
               | {"module.head.last_layer.weight_g": last.parametrizations.weight.original0.detach(),
                  "module.head.last_layer.weight_v": last.parametrizations.weight.original1.detach()})
    torch.save({"student": teacher, "teacher": teacher, "epoch": 800,
                "args": argparse.Namespace(arch="resnet50", out_dim=1000), "dino_loss": {"center": torch.zeros(1, 1000)}},
               path)


def _vissl(trunk: dict, heads: dict) -> dict:
    # VISSL checkpoints: classy_state_dict/base_model/model/{trunk,heads}, trunk keys under _feature_blocks.
    return {"phase_idx": 999, "iteration": 1,
            "classy_state_dict": {"train": True, "base_model": {
                "model": {"trunk": {f"_feature_blocks.{k}": v for k, v in trunk.items()}, "heads": heads},
                "meta": {}}}}


def write_simclr(path: Path, arch: str, seed: int = 0) -> None:
    trunk, d = _trunk(arch, seed)
    out = 128 if arch == "resnet50" else 32
    heads = ({f"0.clf.0.{k}": v for k, v in nn.Linear(d, d).state_dict().items()}
             | {f"1.clf.0.{k}": v for k, v in nn.Linear(d, out).state_dict().items()})
    torch.save(_vissl(trunk, heads), path)


def write_barlow(path: Path, arch: str, seed: int = 0) -> None:
    trunk, d = _trunk(arch, seed)
    w = WIDE[arch]
    heads = {}
    for h, (i, o, bn) in enumerate([(d, w, True), (w, w, True), (w, w, False)]):
        heads |= {f"{h}.clf.0.{k}": v for k, v in nn.Linear(i, o, bias=False).state_dict().items()}
        if bn:
            heads |= {f"{h}.clf.1.{k}": v for k, v in nn.BatchNorm1d(o).state_dict().items()}
    torch.save(_vissl(trunk, heads), path)


def write_supervised(path: Path, arch: str, seed: int = 0) -> None:
    # torchvision: a plain state dict including the ImageNet classifier fc
    trunk, d = _trunk(arch, seed)
    torch.save(trunk | {f"fc.{k}": v for k, v in nn.Linear(d, 1000).state_dict().items()}, path)


def _vit_trunk(arch: str, seed: int) -> dict:
    """A random ViT of ``arch`` in float16 (half the bytes; loading casts), with non-trivial norms and
    layer scales, so a load that skips any of them is caught."""
    torch.manual_seed(seed)
    trunk, _ = ARCHES[arch]()
    sd = {k: v.detach().clone() for k, v in trunk.state_dict().items()}
    for k in sd:
        if k.endswith(("norm.weight", "norm1.weight", "norm2.weight", ".gamma", "cls_token")):
            sd[k] = torch.rand_like(sd[k]) + 0.5
    return {k: v.half() for k, v in sd.items()}


def write_dino_vit(path: Path, arch: str, seed: int = 0) -> None:
    # facebookresearch/dino ViT full checkpoint: the teacher is not DDP-wrapped (no "module."), its head is
    # mlp.{0,2,4} (no BN) + a weight-normed last layer to 65536 prototypes (a small one here)
    trunk = _vit_trunk(arch, seed)
    d = trunk["cls_token"].shape[-1]
    mlp = _mlp_sd([nn.Linear(d, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 256)])
    last = nn.utils.parametrizations.weight_norm(nn.Linear(256, 1024, bias=False))
    teacher = ({f"backbone.{k}": v for k, v in trunk.items()} | {f"head.mlp.{k}": v.half() for k, v in mlp.items()}
               | {"head.last_layer.weight_g": last.parametrizations.weight.original0.detach().half(),
                  "head.last_layer.weight_v": last.parametrizations.weight.original1.detach().half()})
    student = {f"module.{k}": v for k, v in teacher.items()}
    torch.save({"student": student, "teacher": teacher, "epoch": 100, "args": argparse.Namespace(arch=arch),
                "dino_loss": {"center": torch.zeros(1, 1024)}}, path)


def write_dinov2(path: Path, arch: str, seed: int = 0) -> None:
    # facebookresearch/dinov2 dinov2_vit*14_pretrain.pth: the backbone's flat state dict, with mask_token
    trunk = _vit_trunk(arch, seed)
    torch.save(trunk | {"mask_token": torch.zeros(1, trunk["cls_token"].shape[-1]).half()}, path)


def write_mae(path: Path, arch: str, seed: int = 0) -> None:
    # facebookresearch/mae mae_pretrain_vit_base.pth: {"model": the encoder}
    torch.save({"model": _vit_trunk(arch, seed)}, path)


WRITERS = {"vicreg": write_vicreg, "dino": write_dino, "simclr": write_simclr, "barlow": write_barlow,
           "supervised": write_supervised}
# the ViT releases: encoder name -> (writer, the arch its file is for)
VIT_WRITERS = {"dino_vits16": (write_dino_vit, "vit_small_patch16"),
               "dino_vitb16": (write_dino_vit, "vit_base_patch16"),
               "dinov2_vits14": (write_dinov2, "vit_small_patch14_dinov2"),
               "dinov2_vitb14": (write_dinov2, "vit_base_patch14_dinov2"), "mae_vitb16": (write_mae, "vit_base_patch16")}


def write_vit(name: str, path: Path, seed: int = 0) -> Path:
    writer, arch = VIT_WRITERS[name]
    writer(path, arch, seed)
    return path
