"""Fetch every weight file a sweep needs into the torch.hub cache, once, on a machine with internet: compute
nodes without it then find them there (point TORCH_HOME at a shared filesystem on both). The same overrides as
launch/sweep.py; ``fetch.download=false`` only checks what is there.

    TORCH_HOME=/shared/torch python launch/fetch_weights.py -m experiment=imagenet128_resnet50 \
        encoder=vicreg,dino,barlow,simclr level=backbone,projector data.url=s3://bucket/imagenet128 storage=s3
"""
import sys

import torch

from pipeline.stages import job_configs
from pipeline.weights_needed import fetch_all, needed
from rcdm.errors import UserError, cli_errors
from rcdm.redaction import printable


BOOLEAN = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def download_option(argv: list[str]) -> tuple[bool, list[str]]:
    """``fetch.download`` as Hydra reads a boolean (``false``, ``False``, ``no``, ...), and the other arguments."""
    download, rest = True, []
    for a in argv:
        key = a.split("=", 1)[0]
        if not key.startswith("fetch."):
            rest.append(a)
        elif key != "fetch.download":
            raise UserError(f"unknown key {key!r}; this command's own key is fetch.download=true|false")
        elif a.split("=", 1)[-1].strip().lower() not in BOOLEAN or "=" not in a:
            raise UserError(f"{a}: fetch.download takes true or false")
        else:
            download = BOOLEAN[a.split("=", 1)[1].strip().lower()]
    return download, rest


def main(argv: list[str]) -> list[dict]:
    download, args = download_option(list(argv))
    files, notes = [], []
    for cfg in job_configs(args):
        f, n = needed(cfg)
        files += f
        notes += n
    rows = fetch_all(files, download)
    print(f"torch.hub cache: {torch.hub.get_dir()}/checkpoints")
    for r in rows:
        print(printable(f"  {r['what']:<24} {r['state']:<10} checked: {r['checked']:<28} {r['path']}"))
    for note in dict.fromkeys(notes):
        print(f"  {printable(note)}")  # notes quote a manifest: someone else's text
    if not rows:
        print("  nothing to fetch")
    return rows


if __name__ == "__main__":
    with cli_errors():
        main(sys.argv[1:])
