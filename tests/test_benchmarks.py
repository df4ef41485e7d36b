"""The benchmarks run: each script's smallest setting end to end on the CPU, writing the JSON the docs and the
plan read (their figures are measured elsewhere, on quiet machines and GPUs; these only check that they run)."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_gpu_step_runs_reduced_on_cpu_and_records_the_machine(tmp_path):
    import gpu_step

    out = tmp_path / "gpu_step.json"
    gpu_step.main(["--reduced", "--presets", "tiny,adm128", "--encoders", "vicreg", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["reduced"] is True and r["machine"]["cpu"] and r["device"].startswith("cpu")
    for preset in ("tiny", "adm128"):
        for path in ("fp32_eager", "rcdm"):
            row = r["presets"][preset][path]
            assert row["step_s"] > 0 and row["images_per_s"] == pytest.approx(row["batch"] / row["step_s"])
            assert row["forward_gflop_per_image"] > 0 and row["achieved_tflops"] > 0
            assert row["fraction_of_bf16_peak"] is None and row["peak_memory_gb"] is None  # no GPU, no peak
    assert r["presets"]["adm128"]["config"]["channel_mult"] == [1, 1, 2]  # the preset's structure, narrowed
    assert set(r["encoders"]["vicreg"]) == {"fp32", "bf16_channels_last"}


def test_device_peaks_are_matched_on_the_device_name():
    from rcdm.cost import peak_tflops

    names = {"NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0,
             "NVIDIA A100-SXM4-80GB": 312.0, "Tesla T4": None}
    assert {name: peak_tflops(name) for name in names} == names


SMALLEST = {  # each benchmark's command line at its smallest: they run in CI so that none can rot
    "training": ["--presets", "tiny", "--images", "8"],
    "shard_throughput": ["--images", "4", "--arch", "tiny", "--batch", "2", "--repeats", "1", "--rss-sizes", "8,16"],
    "unet_forward": ["--presets", "tiny", "--repeats", "1"],
    "sampling": ["--images", "2", "--settings", "ddim5,ddim2"],
    "side_by_side": ["--steps", "2", "--threads", "2"],
    "encoder_curves": ["--method", "vicreg", "--every", "1", "--overrides", "steps=2 images=64 batch_size=16",
                       "--train-images", "64", "--test-images", "32", "--projector-width", "64",
                       "--projector-depth", "3", "--trunk-blocks", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_every_benchmark_runs_at_its_smallest(name, tmp_path):
    import subprocess

    out, scratch = tmp_path / f"{name}.json", tmp_path / "tmp"
    scratch.mkdir()
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *SMALLEST[name], "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "TMPDIR": str(scratch)})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r.get("machine") or r.get("_machine"))["cpu"]
    assert not list(scratch.iterdir())  # its scratch runs and images are removed, not left in /tmp per run
    if name == "encoder_curves":  # a point per step, each level read; projector and trunk changed as asked
        assert [pt["step"] for pt in r["points"]] == [1, 2] and r["projector_width"] == 64
        assert r["projector_depth"] == 3 and r["trunk_blocks"] == 2
        from rcdm.encoders.backbones import TinyResNet

        assert r["parameters"]["trunk"] > sum(p.numel() for p in TinyResNet().parameters())  # the deeper trunk
        assert r["parameters"]["projector"] == (128 * 64 + 64) + 2 * (64 * 64 + 64) + 3 * 2 * 64 + 64 * 64
        assert set(r["points"][-1]["levels"]) == {"backbone", "projector"}


@pytest.mark.slow
def test_convergence_benchmark_runs_at_its_smallest(tmp_path, dataset):
    import subprocess

    out, work = tmp_path / "convergence.json", tmp_path / "work"

    def bench(stops: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--arms", "vpred",
                               "--stops", stops, "--encoder", "dino", "--data", dataset, "--overrides",
                               "train.batch_size=4 faithfulness.images=2 factor_reads.reference_images=16 grid.images=2 "
                               "grid.samples=1 invariance.images=0", "--out", str(out), "--work", str(work)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=900)

    p = bench("2")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    (point,) = r["arms"]["vpred"]
    assert point["step"] == 2 and 0 < point["mrr"] <= 1 and "shape" in point["factors"]
    assert out.with_suffix(".png").exists()
    # called again on the kept runs: the arm resumes at step 2 and its curve grows by the new stop
    p = bench("3")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stdout + p.stderr and "at step 2" in p.stdout + p.stderr
    first, second = json.loads(out.read_text())["arms"]["vpred"]
    assert first == point and second["step"] == 3 and second["train_seconds"] > first["train_seconds"]
    # the same stops again: every one is measured, nothing trains, the curve stays
    p = bench("2,3")
    assert p.returncode == 0 and "every stop asked for is measured already" in p.stdout, p.stderr[-3000:]
    assert json.loads(out.read_text())["arms"]["vpred"] == [first, second]
    # a stop the run has passed without measuring it would evaluate its later model under an earlier step: refused
    r = json.loads(out.read_text())
    r["arms"]["vpred"] = [first]
    out.write_text(json.dumps(r))
    p = bench("3")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
        "error: arm vpred already stands at step 3"), p.stderr[-2000:]
    assert [q["step"] for q in json.loads(out.read_text())["arms"]["vpred"]] == [2]
    # without the curve, evaluated runs are not resumed into a new one that would lack their points ...
    out.unlink()
    p = bench("4")
    assert p.returncode == 2 and "holds evaluated runs but" in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    # ... but a run stopped before its first evaluation (a checkpoint, no curve yet) resumes where it stopped
    (faith,) = work.glob("runs/convergence/vpred/*/faithfulness.json")
    faith.unlink()
    p = bench("4")
    assert p.returncode == 0 and "at step 3" in p.stdout + p.stderr, p.stderr[-3000:]
    assert [q["step"] for q in json.loads(out.read_text())["arms"]["vpred"]] == [4]


@pytest.mark.slow
def test_scale_benchmark_runs_reduced(tmp_path):
    """benchmarks/scale.py end to end at a small size (40 shards on moto, 4 runs on an MLflow server): the JSON has
    every figure, and streams that do not divide the shards still get equal samples (whole shards would not)."""
    import scale

    shards, per_shard = 24, 8
    r = scale.main(["--shards", str(shards), "--per-shard", str(per_shard), "--streams", "5,7", "--runs", "4",
                    "--loss-points", "5", "--out", str(tmp_path / "scale.json")])
    assert json.loads((tmp_path / "scale.json").read_text())["runs"] == 4
    assert r["start"]["first_batch_s"] > 0 and r["resume"]["shards_read"] >= 1
    for a in r["assignment"]:
        assert a["samples_max"] - a["samples_min"] <= 1 and a["whole_shards_round_robin_imbalance"] > 0.1
        assert a["samples_min"] * a["streams"] <= shards * per_shard <= a["samples_max"] * a["streams"]
    assert r["mlflow"]["report_s"] > 0 and r["mlflow"]["search_children_s"] > 0
    assert set(r["met"]) == {"start", "resume", "imbalance", "report"} and set(r["measured"]) == {"s3", "mlflow"}
    # the MLflow half alone, again: the S3 half's figures and the machine they were measured on stay
    again = scale.main(["--parts", "mlflow", "--runs", "2", "--loss-points", "3", "--out", str(tmp_path / "scale.json")])
    assert again["start"] == r["start"] and again["measured"]["s3"] == r["measured"]["s3"] and again["runs"] == 2


def test_time_to_shape_bar_asks_no_more_than_the_embedding_holds():
    import time_to_shape as tts

    p = {"shape": 0.88, "shape_bound": 0.91, "colour": 0.40, "colour_bound": 0.42, "background": 0.95,
         "background_bound": 1.0, "mrr": 0.93}
    assert tts.meets_bar(p)  # colour within 0.05 of the little the embedding holds
    assert not tts.meets_bar({**p, "colour_bound": 0.98})  # an embedding that holds colour: 0.9 is asked
    assert not tts.meets_bar({**p, "shape": 0.85}) and not tts.meets_bar({**p, "mrr": 0.89})
    assert not tts.meets_bar({**p, "background": 0.85})


def test_time_to_shape_merges_arms_run_side_by_side_and_refuses_other_encoders(tmp_path, capsys):
    import time_to_shape as tts

    point = {"step": 400, "cpu_s": 200.0, "wall_s": 210.0, "shape": 0.3, "shape_ci95": [0.25, 0.36],
             "shape_bound": 0.91, "colour": 0.4, "colour_bound": 0.42, "background": 0.9, "background_bound": 0.96,
             "mrr": 0.5}

    def part(name: str, arm: str, **kw) -> Path:
        r = {"machine": {"cpu": name}, "encoder": "vicreg", "level": "backbone", "bar": tts.BAR, "cap_cpu_s": 1500,
             "release_overrides": tts.RELEASE, "arms": {arm: {"overrides": [arm], "points": [point]}}, **kw}
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        return tmp_path / f"{name}.json"

    out = tmp_path / "all.json"
    r = tts.main(["--merge", str(part("a", "baseline")), str(part("b", "bf16")), "--out", str(out)])
    assert json.loads(out.read_text()) == r and out.with_suffix(".png").exists()
    assert list(r["arms"]) == ["baseline", "bf16"] and r["arms"]["bf16"]["machine"] == {"cpu": "b"}
    for bad, why in ((part("c", "lr2x", level="projector"), "merge results of one encoder"),
                     (part("d", "bf16"), "arm bf16 is in")):
        with pytest.raises(SystemExit) as e:
            tts.main(["--merge", str(part("a", "baseline")), str(part("b", "bf16")), str(bad), "--out",
                      str(tmp_path / "x.json")])
        assert e.value.code == 2 and not (tmp_path / "x.json").exists()
        assert why in capsys.readouterr().err


@pytest.mark.slow
def test_time_to_shape_runs_at_its_smallest_resumes_and_refuses_a_changed_recipe(tmp_path, dataset):
    import subprocess

    out, work = tmp_path / "tts.json", tmp_path / "work"

    def bench(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_to_shape.py"), "--encoder", "dino",
                               "--data", dataset, "--images", "4", "--every", "2", "--reader", "16,20",
                               "--threads", "1", "--out", str(out), "--work", str(work), *extra],
                              cwd=tmp_path, capture_output=True, text=True, timeout=900)

    base = "train.batch_size=4"
    p = bench("--arms", "baseline,lr2x", "--cap", "0.001", "--overrides", base)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["machine"]["cpu"] and r["machine"]["threads"] == 1 and r["cap_cpu_s"] == 0.001
    for name in ("baseline", "lr2x"):
        (point,) = r["arms"][name]["points"]  # one stop: the cap is spent
        assert point["step"] == 2 and point["cpu_s"] > 0 and 0 < point["mrr"] <= 1 and point["shape_bound"] is not None
        assert r["arms"][name]["cpu_s_to_bar"] is None and r["arms"][name]["steps_to_bar"] is None
    assert r["arms"]["baseline"]["points"][0]["precision"] == "fp32"
    assert "train.lr=8e-3" in r["arms"]["lr2x"]["overrides"] and out.with_suffix(".png").exists()
    # a larger cap: the arm resumes from its step-2 run (one more stop), the earlier point kept
    p = bench("--arms", "baseline", "--cap", str(r["arms"]["baseline"]["points"][0]["cpu_s"] + 1e-3),
              "--overrides", base)
    assert p.returncode == 0 and "at step 2" in p.stdout + p.stderr, p.stderr[-3000:]
    assert [q["step"] for q in json.loads(out.read_text())["arms"]["baseline"]["points"]] == [2, 4]
    # the same arm under another recipe would mix two recipes in one curve: one error line, nothing written
    before = out.read_text()
    p = bench("--arms", "baseline", "--overrides", "train.batch_size=8")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: arm baseline in"), p.stderr
    assert out.read_text() == before
    # overrides that do not compose: one error line naming the arm
    p = bench("--arms", "bf16", "--out", str(tmp_path / "other.json"), "--overrides", "train.no_such_key=1")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
        "error: arm bf16: its overrides do not compose"), p.stderr[-2000:]
