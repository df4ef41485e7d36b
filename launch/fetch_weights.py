"""Fetch every weight file a sweep needs into the torch.hub cache, once, on a machine with internet: compute
nodes without it then find them there (point TORCH_HOME at a shared filesystem on both). The same overrides as
launch/sweep.py; ``fetch.download=false`` only checks what is there.

    TORCH_HOME=/shared/torch python launch/fetch_weights.py -m experiment=imagenet128_resnet50 \
        encoder=vicreg,dino,barlow,simclr level=backbone,projector data.url=s3://bucket/imagenet128 storage=s3 \
        storage.run_root=s3://bucket/runs
"""
import sys

import torch

from pipeline.command_line import sweep_command
from pipeline.weights_needed import fetch_all, needed
from rcdm.errors import cli_errors
from rcdm.redaction import printable


def main(argv: list[str]) -> list[dict]:
    configs, opts = sweep_command("fetch", list(argv))
    files, notes = [], []
    for cfg in configs:
        f, n = needed(cfg)
        files += f
        notes += n
    rows = fetch_all(files, opts.download)
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
