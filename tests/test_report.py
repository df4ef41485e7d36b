"""The sweep report: written at the end of a real sweep, logged to its parent run, opened in a real
headless browser (Debian's Chromium) as a person would; unfinished and failed runs are named, never a crash."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import open_page
from mlflow.tracking import MlflowClient

from rcdm.config import TrackingConfig
from rcdm.report import ReportConfig, write_report
from rcdm.report.collect import expected_jobs, recorded_overrides
from rcdm.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.steps=6", "train.batch_size=8", "train.log_every=3", "train.checkpoint_every=6",
         "train.sample_every=6", "train.loader_workers=0", "grid.images=4", "grid.samples=2", "grid.steps=ddim3",
         "faithfulness.steps=ddim3", "diagnostic.images=4"]


@pytest.mark.slow
def test_the_report_of_a_finished_sweep_loads_in_a_browser(tmp_path, dataset):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "-m", "encoder=dino",
                        "level=backbone,projector", "data=shards", f"data.url={dataset}",
                        f"storage.run_root={tmp_path / 'runs'}", f"tracking.uri={uri}", "fidelity.features=encoder",
                        *SMALL], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    html = tmp_path / "reports" / "rcdm-demo" / "main" / "report.html"
    assert f"report {Path('reports/rcdm-demo/main/report.html')}" in r.stdout, r.stdout[-2000:]
    client = MlflowClient(uri)
    (parent,) = [x for x in client.search_runs([client.get_experiment_by_name("rcdm-demo").experiment_id])
                 if x.data.tags.get("kind") == "sweep"]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/faithfulness.png", "report/samples.png", "report/loss.png"} <= logged

    page = open_page(html, tmp_path / "report.png")
    assert page["errors"] == [] and page["failed"] == []
    # the encoder x level table, the factor reads (synthetic data), the invariance table, the config differences,
    # one provenance row per run, and where each run's time went
    assert page["tables"] == {"results": 2, "factors": 2, "invariance": 2, "config": 2, "provenance": 2,
                              "timing": 2}, page["tables"]
    images = page["images"]
    assert {i["alt"] for i in images} >= {"faithfulness.png", "conditioning.png", "loss.png",
                                          "dino-backbone-tiny samples", "dino-projector-tiny samples"}
    assert all(i["complete"] and i["width"] > 0 and i["src_kind"] == "data:image/png;base64," for i in images)
    text = page["text"]
    assert "2/2 jobs finished" in text and "FID" in text and "colour_jitter" in text
    assert "level.name" in text  # the config table: level.name and job_name differ, nothing else
    assert "Where the time went" in text and "factor_reads" in text and "training" in text
    assert (tmp_path / "report.png").stat().st_size > 20_000  # a rendered page, not a blank one


def _run(tracker: Tracker, parent: str, encoder: str, level: str, status: str, error: str | None = None) -> None:
    tracker.start(None, f"{encoder}-{level}-tiny", {"encoder": encoder, "level": level,
                                                    "mlflow.parentRunId": parent},
                  {"encoder": {"name": encoder}, "level": {"name": level}, "train": {"steps": 100}})
    tracker.log_metrics({"loss": 0.5}, 40, int(time.time() * 1000))
    if error:
        tracker.set_tag("error", error)
    if status != "RUNNING":
        tracker.end(status)


def test_an_unfinished_sweep_reports_what_is_missing_and_why(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    parent = Tracker(uri, "exp")
    pid = parent.start(None, "sweep s", {"kind": "sweep", "sweep_id": "s"},
                       {"sweep": {"overrides": "encoder=vicreg,dino level=backbone,projector train.lr=1e-3"}})
    _run(Tracker(uri, "exp"), pid, "vicreg", "backbone", "FINISHED")
    _run(Tracker(uri, "exp"), pid, "vicreg", "projector", "FAILED", "FloatingPointError: loss is nan at step 40")
    _run(Tracker(uri, "exp"), pid, "dino", "backbone", "RUNNING")
    out = write_report(ReportConfig(TrackingConfig(uri, "exp"), "s", output=str(tmp_path / "rep")))
    sweep = out["sweep"]
    assert sweep.missing == [({"encoder": "dino", "level": "projector"}, sweep.missing[0][1])]
    assert "no MLflow run" in sweep.missing[0][1]
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "4 job(s) without a finished result" not in html and "3 job(s) without a finished result" in html
    assert "FAILED at step 40 of 100: FloatingPointError: loss is nan at step 40" in html
    assert "RUNNING at step 40 of 100" in html and "encoder=dino level=projector" in html
    assert "1/4 jobs finished" in html
    assert {a.path for a in MlflowClient(uri).list_artifacts(pid, "report")} >= {"report/report.html"}


def test_a_sweep_of_many_encoders_draws_the_first_and_tables_every_run(tmp_path):
    """At a thousand runs a page of every grid and every bar was 152 MB: past ``pictured`` encoders the figures and
    grids draw the first ones by name and say so, while every run's end-of-run numbers still fill the tables; grids
    and loss histories are read only for the runs drawn (an unfinished run's history is read: the page says where
    it stopped)."""
    import io

    from PIL import Image

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    parent = Tracker(uri, "exp")
    pid = parent.start(None, "sweep s", {"kind": "sweep", "sweep_id": "s"},
                       {"sweep": {"overrides": "encoder=e0,e1,e2,e3 level=backbone"}})
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    for i in range(4):
        t = Tracker(uri, "exp")
        _run(t, pid, f"e{i}", "backbone", "RUNNING" if i == 3 else "FINISHED")
        t.log_bytes(buf.getvalue(), "samples/step-000000040.png")
        t.log_bytes(json.dumps({"mrr": 0.5 + i / 10, "mrr_ci95": [0.4, 0.9], "top1": 0.5, "top1_ci95": [0.4, 0.6],
                                "n": 8, "chance": {"mrr": 0.34, "top1": 0.125}, "keys": []}).encode(),
                    "faithfulness.json")
    out = write_report(ReportConfig(TrackingConfig(uri, "exp"), "s", output=str(tmp_path / "rep"), pictured=2))
    runs = {r.encoder: r for r in out["sweep"].runs}
    assert [e for e, r in runs.items() if r.pictured] == ["e0", "e1"]
    assert runs["e0"].grid is not None and runs["e2"].grid is None and runs["e3"].grid is None
    assert runs["e0"].loss and not runs["e2"].loss and runs["e3"].loss == [(40, 0.5)]
    assert all("faithfulness" in r.end for r in runs.values())  # every run's numbers, drawn or not
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "draw the first 2 of 4 encoders by name" in html
    assert html.count('<img class="grid"') == 2
    assert "0.800" in html and "RUNNING at step 40 of 100" in html  # e3's MRR in the table, its stop in problems
    small = write_report(ReportConfig(TrackingConfig(uri, "exp"), "s", output=str(tmp_path / "all")))
    assert all(r.pictured for r in small["sweep"].runs) and "draw the first" not in (tmp_path / "all" / "report.html").read_text()


def test_a_sweep_that_does_not_exist_is_a_clear_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    Tracker(uri, "exp")
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "report.py"), f"tracking.uri={uri}", "tracking.experiment=exp",
                        "sweep_id=nope"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "has no sweep with sweep_id='nope'" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_expected_jobs_are_the_product_of_the_swept_overrides():
    assert expected_jobs(["encoder=a,b", "level=x,y", "data.url=/d"]) == [
        {"encoder": "a", "level": "x"}, {"encoder": "a", "level": "y"}, {"encoder": "b", "level": "x"},
        {"encoder": "b", "level": "y"}]
    assert expected_jobs(["encoder=a,b", "level=x"]) == [{"encoder": "a"}, {"encoder": "b"}]  # only what is swept
    assert expected_jobs([]) == [{}]


def test_recorded_overrides_keep_a_quoted_space():
    """A dataset path with a space: the parent records its overrides as a JSON list, so the report reads them back
    whole (they were joined by spaces and split again, and the report failed); older parents' strings still read."""
    task = ["encoder=a,b", "data.url='/data/my set'"]
    assert recorded_overrides(json.dumps(task)) == task
    assert expected_jobs(recorded_overrides(json.dumps(task))) == [{"encoder": "a"}, {"encoder": "b"}]
    assert recorded_overrides("encoder=a,b level=x") == ["encoder=a,b", "level=x"]
    assert expected_jobs(["data.url=/data/my set'"]) is None  # unparsable: no list of missing jobs, no failure


def test_a_value_a_hair_outside_its_bootstrap_interval_still_draws():
    """A percentile bootstrap puts its bound on the point estimate up to rounding (0.75 against 0.7500000000000001):
    the bar chart draws it rather than failing the whole report (it did, on a 2-image faithfulness)."""
    from rcdm.report.figures import interval_bars

    png = interval_bars({"vicreg\nbackbone": [("faithfulness MRR", 0.75, [0.7500000000000001, 1.0])]}, "MRR")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_end_of_run_json_reads_back_as_the_record_of_the_room_that_writes_it():
    """The report reads faithfulness, factor reads, invariance, fidelity and timing through the writers' own typed
    records: what the analyses write reads back whole, and a wrong field is named."""
    import torch

    from rcdm.analysis.factor_reads import FactorReads
    from rcdm.analysis.faithfulness import Faithfulness, summarise
    from rcdm.analysis.fidelity import Fidelity
    from rcdm.analysis.invariance import Invariance
    from rcdm.evaluation import Timing
    from rcdm.report.collect import read_end_json
    from rcdm.stats import Estimate, wilson

    written = summarise(torch.tensor([1, 2, 1, 4]), boot=50) | {"keys": ["a", "b", "c", "d"]}
    f = read_end_json("faithfulness", json.loads(json.dumps(written)))
    assert isinstance(f, Faithfulness) and (f.n, f.keys, f.mrr.value) == (4, ("a", "b", "c", "d"), written["mrr"])
    assert f.headline().startswith(f"MRR {Estimate.of(written, 'mrr').format(3)}, top-1 0.500")
    reads = read_end_json("factor_reads", {"factors": {"shape": {"samples": 0.5, "samples_ci95": wilson(2, 4),
                                                                  "bound": None, "chance": 0.25}}})
    assert isinstance(reads, FactorReads) and reads.headline() == "shape 0.50 (bound None)"
    assert read_end_json("invariance", {"families": {"flip": {"invariance_index": 0.9}}}) == Invariance({"flip": 0.9})
    assert read_end_json("fidelity", {"fid": 3.0, "features": "encoder"}) == Fidelity(3.0, None, None, "encoder")
    timing = Timing(10, {"setup": 1.0, "training": 2.5}, 3.5)
    assert read_end_json("timing", json.loads(json.dumps(timing.to_json()))) == timing
    for key, bad, named in (("faithfulness", written | {"top1_ci95": [0.1]}, "top1_ci95 is not an interval"),
                            ("factor_reads", {"factors": {"shape": {"samples": "x"}}}, "shape.samples is not a"),
                            ("invariance", {"families": {"flip": {}}}, "no 'invariance_index'"),
                            ("fidelity", {"fid": float("nan")}, "fid is not a finite number"),
                            ("timing", {"seconds": {"setup": 1.0}}, "no 'total'")):
        with pytest.raises(ValueError, match=named):
            read_end_json(key, bad)
