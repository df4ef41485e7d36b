"""The sweep report: one self-contained HTML page comparing a sweep's runs, logged to its parent MLflow run.

    python launch/report.py                                   # the default sweep, from sqlite:///mlflow.db
    python launch/report.py tracking=server tracking.experiment=rcdm-imagenet sweep_id=main
"""
import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import schemas
from rcdm.errors import cli_errors
from rcdm.report import write_report

schemas.register("report_schema")


@hydra.main(version_base="1.3", config_path="../configs", config_name="report")
def main(cfg: DictConfig) -> None:
    with cli_errors():
        out = write_report(OmegaConf.to_object(cfg))
    sweep = out["sweep"]
    finished = sum(r.status == "FINISHED" for r in sweep.runs)
    print(f"report of sweep {cfg.sweep_id} ({finished} finished runs, {len(sweep.missing)} missing): {out['html']}")
    print(f"in MLflow: {out['link']}")


if __name__ == "__main__":
    main()
