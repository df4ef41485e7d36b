"""Reliability, round two: the surfaces that read run folders, sweep records, model cards and manifests written by
someone else (export, report, model cards, relaunches; status,
plan, fetch and the lease: tests/test_hostile_sweeps.py), tried as an attacker with write access
to a shared folder or tracking server and as a careless user would. Each case ends in one clear error or the
documented behaviour: nothing outside the run or --out is written, no run is ended by a record it does not own,
no password reaches the console."""
import json
import re
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rcdm import train_checkpoints
from rcdm.errors import UserError
from rcdm.storage import open_fs, write_json
from rcdm.train import train

QUICK = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2", "train.sample_every=2",
         "train.loader_workers=0", "grid.images=2", "grid.samples=1", "grid.steps=ddim2", "faithfulness.images=0",
         "invariance.images=0", "diagnostic.images=0"]


def job(typed, dataset, tmp_path, *extra):
    return typed("sweep", ["encoder=dino", "level=backbone", "data=shards", f"data.url={dataset}",
                           f"storage.run_root={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                           *QUICK, *extra])


def runs(tmp_path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


# ---- atomic writes and links (the severe case) --------------------------------------------------------------------

def test_atomic_writes_never_follow_a_planted_link(tmp_path):
    """Someone who can write in a shared folder plants ``<file>.tmp-<pid>`` links for the next pids: a write of
    ``<file>`` must neither overwrite the link's target nor leave the final name a link."""
    victim = tmp_path / "victim"
    victim.write_text("the launching user's file")
    shared = tmp_path / "sweep"
    shared.mkdir()
    for pid in range(max(2, os.getpid() - 50), os.getpid() + 50):
        (shared / f"parent_run.json.tmp-{pid}").symlink_to(victim)
    fs, root = open_fs(str(shared))
    write_json(fs, f"{root}/parent_run.json", {"run_id": "abc"})
    assert victim.read_text() == "the launching user's file"
    assert not (shared / "parent_run.json").is_symlink() and json.loads((shared / "parent_run.json").read_text())
    # the tracked file itself a link: refused, nothing written through it
    (shared / "lease.json").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        write_json(fs, f"{root}/lease.json", {"x": 1})
    assert victim.read_text() == "the launching user's file"


@pytest.mark.parametrize("planted", ["checkpoints", "mlflow_run.json"])
def test_a_run_folder_holding_a_link_is_refused_before_training(typed, dataset, tmp_path, planted):
    cfg = job(typed, dataset, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Path(cfg.run_root).mkdir(parents=True)
    (Path(cfg.run_root) / planted).symlink_to(elsewhere / planted)
    with pytest.raises(UserError, match="symbolic link"):
        train(cfg)
    assert not list(elsewhere.iterdir()) and not runs(tmp_path)


def test_an_unwritable_run_root_is_one_error(typed, dataset, tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = job(typed, dataset, tmp_path, f"storage.run_root={tmp_path / 'afile' / 'runs'}")
    with pytest.raises(UserError, match="cannot write"):
        train(cfg)


# ---- export -------------------------------------------------------------------------------------------------------

def _finished_run(typed, dataset, tmp_path, encoder="dino", **files) -> str:
    """A run folder as a finished demo training leaves it (checkpoint at its last step, result files), without
    training: export reads only these files."""
    from rcdm.data import open_dataset
    from rcdm.train import model_card

    cfg = job(typed, dataset, tmp_path)
    info = open_dataset(cfg.data.url, "dino", "backbone", "train")
    card = model_card(cfg, info).with_device("cpu")
    net = card.build()
    meta = card.to_dict()
    meta["encoder"]["name"] = encoder  # what the checkpoint says; export names its files after it
    state = {"step": cfg.train.steps, "train_seconds": 1.0, "model": net.state_dict(), "ema": net.state_dict(),
             "optimizer": {}, "config": cfg.to_dict(), "meta": meta}
    train_checkpoints.save(cfg.run_root, state)
    for name, body in {"faithfulness.json": {}, "conditioning.json": {"final": {}}, **files}.items():
        (Path(cfg.run_root) / name).write_text(json.dumps(body))
    return cfg.run_root


def test_a_refused_export_leaves_the_shipped_model_untouched(typed, dataset, tmp_path):
    from rcdm.demo_release import export

    out = tmp_path / "out"
    out.mkdir()
    (out / "dino-backbone.pt").write_bytes(b"the shipped file")
    run = _finished_run(typed, dataset, tmp_path, **{"init_from.json": {"source": "rcdm_ema_dino_trunk.pt"}})
    with pytest.raises(UserError, match="steps and seconds are not on record"):
        export(run, out)
    assert (out / "dino-backbone.pt").read_bytes() == b"the shipped file" and sorted(os.listdir(out)) == [
        "dino-backbone.pt"]


@pytest.mark.parametrize("name", ["../../escaped", "/abs/escaped", "Dino"])
def test_export_never_writes_outside_out(typed, dataset, tmp_path, name):
    from rcdm.demo_release import export

    name = name.replace("/abs", str(tmp_path))
    run = _finished_run(typed, dataset, tmp_path / "r", encoder=name)
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(UserError, match="not a demo model name"):
        export(run, out)
    assert not out.exists() and not list(tmp_path.glob("**/*escaped*"))


# ---- the report ---------------------------------------------------------------------------------------------------

def test_the_report_escapes_artifacts_survives_a_malformed_one_and_reads_quoted_overrides(tmp_path):
    """Anyone who may log to a run can write its factor_reads.json: its text reaches the page escaped, a malformed
    file costs its own cells only, and a sweep whose overrides hold a quoted space still gets its report."""
    from rcdm.config import TrackingConfig
    from rcdm.report import ReportConfig, write_report
    from rcdm.tracking import PARENT_TAG, Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    parent = Tracker(uri, "exp")
    task = ["encoder=vicreg,dino", "data.url='/data/my set'"]
    parent.start(None, "sweep main", {"kind": "sweep", "sweep_id": "main"}, {"sweep": {"overrides": json.dumps(task)}})
    evil = "<script>alert(1)</script>"
    for enc, body in (("vicreg", {"factors": {evil: {"samples": 0.5, "samples_ci95": [0.4, 0.6], "bound": 0.7,
                                                      "chance": 0.25}}}),
                      ("dino", {"factors": [evil]})):
        child = Tracker(uri, "exp")
        child.start(None, f"{enc}-backbone-tiny", {"encoder": enc, "level": "backbone", PARENT_TAG: parent.run_id},
                    {"encoder": {"name": enc}, "level": {"name": "backbone"}})
        child.log_bytes(json.dumps(body).encode(), "factor_reads.json")
        child.log_bytes(json.dumps({"n": evil, "mrr": 0.5, "mrr_ci95": [0.4, 0.6], "top1": 0.5, "top1_ci95": [0.4, 0.6],
                                    "chance": {"mrr": 0.1, "top1": 0.1}}).encode(), "faithfulness.json")
        child.end("FINISHED")
    parent.end("FINISHED")
    out = write_report(ReportConfig(tracking=TrackingConfig(uri, "exp"), output=str(tmp_path / "rep")))
    html = Path(out["html"]).read_text()
    assert "<script" not in html and "&lt;script&gt;" in html, html[html.find("missing"):][:2000]
    assert "factor_reads.json (factors is not an object)" in html and "faithfulness.json (n is not a count" in html
    assert "data.url=&#x27;/data/my set&#x27;" in html


# ---- relaunch after a failed end of run ---------------------------------------------------------------------------

def test_a_relaunch_finishes_the_evaluation_a_failed_end_of_run_owes(typed, dataset, tmp_path, monkeypatch):
    from rcdm.analysis import ANALYSES

    cfg = job(typed, dataset, tmp_path, "faithfulness.images=4", "faithfulness.steps=ddim2",
              "factor_reads.enabled=false")
    analysis = ANALYSES["faithfulness"]

    def offline(*a, **k):
        raise RuntimeError("the end-of-run analysis failed (an offline download, out of memory)")
    monkeypatch.setattr(analysis, "run", offline)
    with pytest.raises(RuntimeError, match="end-of-run"):
        train(cfg)
    assert not (Path(cfg.run_root) / "faithfulness.json").exists()
    monkeypatch.undo()
    assert train(cfg)["step"] == 2
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and "faithfulness_mrr" in run.data.metrics
    assert (Path(cfg.run_root) / "faithfulness.json").exists()
    assert json.loads((Path(cfg.run_root) / "evaluated.json").read_text())["step"] == 2


def test_no_grid_is_drawn_with_grid_images_0(typed, dataset, tmp_path):
    cfg = job(typed, dataset, tmp_path, "grid.images=0")
    assert train(cfg)["step"] == 2
    assert not (Path(cfg.run_root) / "samples").exists()


@pytest.mark.parametrize("override, message", [("grid.steps=ddim0", "grid.steps='ddim0' is not a sampling schedule"),
                                               ("faithfulness.steps=abc", "faithfulness.steps='abc' is not"),
                                               ("grid.guidance=nan", "grid.guidance=nan must be a finite"),
                                               ("train.lr=inf", "train.lr=inf must be a positive finite"),
                                               ("train.lease_s=inf", "train.lease_s=inf is out of range")])
def test_values_that_would_fail_after_training_are_refused_at_launch(typed, dataset, tmp_path, override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        job(typed, dataset, tmp_path, override)


def test_a_one_image_split_is_refused_for_normalised_embeddings(typed, make_dataset, tmp_path):
    data = make_dataset(tmp_path / "one", train=1, val=2)
    cfg = typed("sweep", ["encoder=dino", "level=backbone", "data=shards", f"data.url={data}",
                          "recipe.normalize_embeddings=true", f"storage.run_root={tmp_path / 'runs'}",
                          f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", *QUICK])
    with pytest.raises(UserError, match="need the statistics of at least 2"):
        train(cfg)


# ---- model cards and manifests size nothing without a bound -------------------------------------------------------

def _checkpoint(tmp_path, **meta_changes) -> str:
    from rcdm.presets import build_unet

    net = build_unet("tiny", 128, out_channels=3)
    meta = {"format": "rcdm-model-card", "version": 1, "preset": "tiny", "embed_dim": 128, "image_size": 32,
            "process": {"schedule": "cosine", "num_steps": 1000, "prediction": "v", "learn_sigma": False},
            "encoder": {"name": "dino", "arch": "tiny", "level": "backbone",
                        "weights": {"kind": "released", "sha256": None, "seed": None, "path": None},
                        "preprocess": {"size": 32, "crop": "center", "normalize": "minus_one_one"}},
            "unet": {"out_channels": 3}, "recipe": None, "dataset": None, "device": "cpu"}
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    run = tmp_path / "run"
    train_checkpoints.save(str(run), {"step": 1, "model": {}, "ema": net.state_dict(), "optimizer": {}, "meta": meta})
    return str(run)


@pytest.mark.parametrize("change, message", [
    ({"embed_dim": 10 ** 12}, "gives embed_dim 1000000000000"),
    ({"unet": {"out_channels": 3, "model_channels": 10 ** 6}}, "sets UNet option model_channels"),
    ({"preset": "huge"}, "names UNet preset 'huge'"),
    ({"image_size": 99999}, "gives image_size 99999"),
    ({"process": {"schedule": "cosine", "num_steps": 10 ** 12, "prediction": "v", "learn_sigma": False}},
     "describes a diffusion"),
    ({"process": None}, "does not hold an rcdm model card \\(no 'process'\\)"),
    ({"embed_dim": 256}, "does not fit its weights")])
def test_a_forged_model_card_is_one_error_before_anything_is_built(tmp_path, change, message):
    from rcdm.model_files import load_checkpoint

    with pytest.raises(UserError, match=message):
        load_checkpoint(_checkpoint(tmp_path, **change))


def test_a_manifest_cannot_size_a_model(dataset, tmp_path):
    import shutil

    from rcdm.manifest import read_manifest

    data = tmp_path / "d"
    shutil.copytree(dataset, data)
    m = json.loads((data / "manifest.json").read_text())
    m["encoders"]["dino"]["levels"]["backbone"] = 10 ** 9
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="are not dims from 1 to 16384"):
        read_manifest(str(data))


def test_a_demo_record_naming_another_models_file_is_refused(tmp_path):
    import shutil

    from rcdm.demo_release import DEMO_DIR, load_demo

    for f in ("vicreg-backbone", "dino-projector"):
        for ext in (".pt", ".json"):
            shutil.copy(DEMO_DIR / f"{f}{ext}", tmp_path / f"{f}{ext}")
    rec = json.loads((tmp_path / "dino-projector.json").read_text())
    vic = json.loads((tmp_path / "vicreg-backbone.json").read_text())
    (tmp_path / "dino-projector.json").write_text(json.dumps({**rec, "weights_file": "vicreg-backbone.pt",
                                                              "sha256": vic["sha256"]}))
    with pytest.raises(UserError, match="names weights file 'vicreg-backbone.pt'"):
        load_demo("demo:dino-projector", tmp_path)
    # a record whose fields are not of their types is refused by name, before any file it names is opened
    for broken in ({**rec, "training": {**rec["training"], "steps": "many"}}, {**rec, "faithfulness": [1]},
                   {k: v for k, v in rec.items() if k != "sha256"}):
        (tmp_path / "dino-projector.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match=r"dino-projector.json is not a demo model record \((Value|Type|Key)Error"):
            load_demo("demo:dino-projector", tmp_path)


@pytest.mark.parametrize("record,why", [([1, 2], "no source"), ({"steps": 3}, "no source"),
                                        ({"source": "x", "steps": "3"}, "steps '3'"),
                                        ({"source": "x", "steps": True}, "steps True"),
                                        ({"source": "x", "train_seconds": float("nan")}, "train_seconds nan"),
                                        ({"source": "x", "parts": "../all"}, "parts '../all'"),
                                        ({"source": "x", "device": {"rm": "-rf"}}, "a text field that is not text")])
def test_a_start_record_from_a_run_folder_is_type_checked(tmp_path, record, why):
    import fsspec

    from rcdm import train_checkpoints as tc

    (tmp_path / tc.INIT_FILE).write_text(json.dumps(record))
    with pytest.raises(UserError, match=rf"init_from.json is not a start record rcdm wrote \({re.escape(why)}"):
        tc.read_start(fsspec.filesystem("file"), str(tmp_path))
    (tmp_path / tc.INIT_FILE).write_text(json.dumps({"source": "demo:dino-backbone", "steps": 4800, "parts": "decoder",
                                                      "train_seconds": 1.5, "lr": 0.004}))
    got = tc.read_start(fsspec.filesystem("file"), str(tmp_path))
    assert (got.steps, got.parts, got.training) == (4800, "decoder", {"lr": 0.004}) and "conditioning" in got.how
    assert tc.read_start(fsspec.filesystem("file"), str(tmp_path / "nowhere")) is None
