"""Readers for each release's checkpoint layout, mapping its keys onto ``SSLEncoder``'s names.

Our names: ``backbone.<torchvision ResNet name>`` and ``projector.<index in the nn.Sequential>``.
Each reader returns (state dict in our names, keys it dropped on purpose). Anything else left over
makes the strict load fail, so a file of the wrong method or architecture is caught.
"""
from __future__ import annotations

from typing import Callable

import torch

StateDict = dict[str, torch.Tensor]


def _strip(sd: StateDict, prefix: str) -> StateDict:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def _split_ignored(sd: StateDict, ignored: tuple[str, ...]) -> tuple[StateDict, list[str]]:
    kept = {k: v for k, v in sd.items() if not k.startswith(ignored)}
    return kept, sorted(set(sd) - set(kept))


def _dig(ckpt: dict, *path: str) -> dict:
    node = ckpt
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"checkpoint has no {'/'.join(path)} (missing {key!r})")
        node = node[key]
    return node


def read_vicreg(ckpt: dict) -> tuple[StateDict, list[str]]:
    """facebookresearch/vicreg ``resnet50_fullckpt.pth``: ``["model"]`` = {backbone.*, projector.*}."""
    sd = _strip(_dig(ckpt, "model"), "module.")
    return _split_ignored(sd, ("backbone.fc.",))


def read_dino(ckpt: dict) -> tuple[StateDict, list[str]]:
    """facebookresearch/dino full checkpoint: the teacher; its head's weight-normed last layer is unused."""
    sd = _strip(_dig(ckpt, "teacher"), "module.")
    sd, dropped = _split_ignored(sd, ("head.last_layer.", "backbone.fc."))
    return {("projector." + k[len("head.mlp."):] if k.startswith("head.mlp.") else k): v
            for k, v in sd.items()}, dropped


def _read_vissl(head_map: dict[str, int]) -> Callable[[dict], tuple[StateDict, list[str]]]:
    """VISSL model-zoo files: trunk under ``_feature_blocks.``, heads as ``<head>.clf.<layer>.``.

    ``head_map`` sends "<head>.<layer>" to the index of that layer in our projector Sequential.
    """

    def read(ckpt: dict) -> tuple[StateDict, list[str]]:
        model = _dig(ckpt, "classy_state_dict", "base_model", "model")
        sd = {"backbone." + k: v for k, v in _strip(_dig(model, "trunk"), "_feature_blocks.").items()}
        for k, v in model.get("heads", {}).items():
            parts = k.split(".")  # <head>.clf.<layer>.<param>
            ours = head_map.get(f"{parts[0]}.{parts[2]}") if len(parts) == 4 and parts[1] == "clf" else None
            # a head key we cannot place keeps its own name, so the strict load reports it
            sd[f"projector.{ours}.{parts[-1]}" if ours is not None else "heads." + k] = v
        return sd, []

    return read


# SimCLR: [Linear 2048-2048, ReLU] [Linear 2048-128] -> Sequential(Linear, ReLU, Linear)
read_simclr = _read_vissl({"0.0": 0, "1.0": 2})
# Barlow Twins: [Linear, BN, ReLU] x 2, [Linear] -> Sequential(L, BN, ReLU, L, BN, ReLU, L)
read_barlow = _read_vissl({"0.0": 0, "0.1": 1, "1.0": 3, "1.1": 4, "2.0": 6})


def read_torchvision(ckpt: dict) -> tuple[StateDict, list[str]]:
    """A torchvision ResNet state dict; its ImageNet classifier (``fc``) is not part of the trunk."""
    sd, dropped = _split_ignored(ckpt, ("fc.",))
    return {"backbone." + k: v for k, v in sd.items()}, dropped


def read_dinov2(ckpt: dict) -> tuple[StateDict, list[str]]:
    """facebookresearch/dinov2 ``dinov2_vit*14_pretrain.pth``: the backbone's own state dict; its
    ``mask_token`` (for masked training only) is unused."""
    sd, dropped = _split_ignored(ckpt, ("mask_token",))
    return {"backbone." + k: v for k, v in sd.items()}, dropped


def read_mae(ckpt: dict) -> tuple[StateDict, list[str]]:
    """facebookresearch/mae ``mae_pretrain_vit_base.pth``: ``["model"]`` = the encoder; a decoder or mask
    token, if a file carries them, are unused."""
    sd, dropped = _split_ignored(_dig(ckpt, "model"), ("decoder", "mask_token"))
    return {"backbone." + k: v for k, v in sd.items()}, dropped


LAYOUTS: dict[str, Callable[[dict], tuple[StateDict, list[str]]]] = {
    "vicreg": read_vicreg, "dino": read_dino, "vissl_simclr": read_simclr,
    "vissl_barlow": read_barlow, "torchvision": read_torchvision, "dinov2": read_dinov2, "mae": read_mae,
}


# The inverse direction: our encoder -> the file its method's release would be --------------------------
_VISSL_HEADS = {"vissl_simclr": {"0.0": 0, "1.0": 2}, "vissl_barlow": {"0.0": 0, "0.1": 1, "1.0": 3, "1.1": 4, "2.0": 6}}
LAYOUT_OF = {"vicreg": "vicreg", "dino": "dino", "simclr": "vissl_simclr", "barlow": "vissl_barlow",
             "supervised": "torchvision"}


def to_release_layout(encoder, extra: dict | None = None) -> dict:
    """The checkpoint dict that ``LAYOUTS[layout]`` reads back into ``encoder``. ``extra`` holds modules
    the release keeps beside the encoder (DINO's ``head.last_layer``)."""
    sd = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    layout = LAYOUT_OF[encoder.name]
    if layout == "vicreg":
        return {"model": sd}
    if layout == "dino":
        teacher = {("head.mlp." + k[len("projector."):] if k.startswith("projector.") else k): v for k, v in sd.items()}
        for prefix, module in (extra or {}).items():
            for k, v in module.state_dict().items():  # weight-norm parametrisation -> weight_g / weight_v
                name = {"parametrizations.weight.original0": "weight_g",
                        "parametrizations.weight.original1": "weight_v"}.get(k, k)
                teacher[f"{prefix}.{name}"] = v.detach().cpu().clone()
        return {"teacher": teacher}
    if layout == "torchvision":
        return {k[len("backbone."):]: v for k, v in sd.items()}
    ours_to_vissl = {idx: key for key, idx in _VISSL_HEADS[layout].items()}
    trunk, heads = {}, {}
    for k, v in sd.items():
        if k.startswith("backbone."):
            trunk["_feature_blocks." + k[len("backbone."):]] = v
        else:
            _, idx, param = k.split(".")
            head, layer = ours_to_vissl[int(idx)].split(".")
            heads[f"{head}.clf.{layer}.{param}"] = v
    return {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}}}
