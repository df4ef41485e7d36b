"""What each embedding level of an encoder keeps: per level and labelled factor a linear probe and a k-nearest-
neighbour vote with 95 % intervals, the invariance index per SSL augmentation, each encoder's training cost.

    python launch/retention.py                                   # the demo's four tiny encoders, demo generator
    python launch/retention.py markdown=retention.md           # also the table as Markdown
    python launch/retention.py encoders=[vicreg,barlow] arch=resnet50 images=/data/val-subset train_images=700 \
        test_images=300                                          # labels: the folder's class sub-folders
    python launch/retention.py ship_from=<folder of pretrained tiny encoders> ship_earlier=v1
                                    # swap them into rcdm with their retention numbers; the replaced ones to v1/
"""
import json

from pipeline.schemas import hydra_app
from rcdm.retention import fmt, markdown, retention, ship_tiny
from rcdm.storage import write_local


def run(cfg) -> dict:
    table = ship_tiny(cfg) if cfg.ship_from else retention(cfg)
    write_local(cfg.output, json.dumps(table, indent=2) + "\n")
    if cfg.markdown:
        write_local(cfg.markdown, markdown(table))
    return table


def show(table: dict, cfg) -> None:
    for name, e in table["encoders"].items():
        for level, row in e["levels"].items():
            print(f"{name} {level}: " + ", ".join(f"{f} {fmt(v['knn'])}" for f, v in row.items()), flush=True)
    print(f"k-NN estimates above (probes and invariance in the file): {cfg.output}")


main = hydra_app("retention", run, show)

if __name__ == "__main__":
    main()
