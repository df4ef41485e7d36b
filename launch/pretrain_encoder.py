"""Train a tiny encoder with its own SSL objective on the synthetic images.

    python launch/pretrain_encoder.py method=simclr
"""
from pipeline.schemas import hydra_app
from rcdm.ssl.pretrain import pretrain


def show(record: dict, cfg) -> None:
    print(f"{record['method']}: {record['steps']} steps in {record['seconds']} s, "
          f"loss {record['final']['loss']:.4f} -> {cfg.output} (sha256 {record['sha256'][:12]})")


main = hydra_app("pretrain", pretrain, show)

if __name__ == "__main__":
    main()
