"""Sample an RCDM conditioned on the embeddings of some images; one PNG grid out.

    python launch/sample.py checkpoint=rcdm_ema_dino_trunk.pt images=path/to/folder num_samples=4 steps=100
"""
from pipeline.schemas import hydra_app
from rcdm.sampling import sample_grid


def show(summary: dict, cfg) -> None:
    print(f"wrote {summary['output']} ({len(summary['images'])} images x {cfg.num_samples} samples, "
          f"{summary['sampler']} {summary['steps']} steps, {summary['seconds']:.1f} s)")


main = hydra_app("sample", sample_grid, show)

if __name__ == "__main__":
    main()
