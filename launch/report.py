"""The sweep report: one self-contained HTML page comparing a sweep's runs, logged to its parent MLflow run.

    python launch/report.py                                   # the default sweep, from sqlite:///mlflow.db
    python launch/report.py tracking=server tracking.experiment=rcdm-imagenet sweep_id=main
"""
from pipeline.schemas import hydra_app
from rcdm.report import write_report


def show(out: dict, cfg) -> None:
    sweep = out["sweep"]
    finished = sum(r.status == "FINISHED" for r in sweep.runs)
    print(f"report of sweep {cfg.sweep_id} ({finished} finished runs, {len(sweep.missing)} missing): {out['html']}")
    print(f"in MLflow: {out['link']}")


main = hydra_app("report", write_report, show)

if __name__ == "__main__":
    main()
