"""The benchmarks run: each script's smallest setting end to end on the CPU, writing the JSON the docs and the
plan read (their figures are measured elsewhere, on quiet machines and GPUs; these only check that they run)."""
import json
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
    from rcdm.plan import peak_tflops

    names = {"NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0,
             "NVIDIA A100-SXM4-80GB": 312.0, "Tesla T4": None}
    assert {name: peak_tflops(name) for name in names} == names


@pytest.mark.slow
def test_training_benchmark_input_pipeline_runs(tmp_path):
    import training

    r = training.pipeline(tmp_path, 8, 64)
    assert r["ours_samples_per_s_per_core"] > 0 and r["official_samples_per_s_per_core"] > 0


@pytest.mark.slow
def test_scale_benchmark_runs_reduced(tmp_path):
    """benchmarks/scale.py end to end at a small size (40 shards on moto, 4 runs on an MLflow server): the JSON has
    every figure, and streams that do not divide the shards still get equal samples (whole shards would not)."""
    import scale

    r = scale.main(["--shards", "40", "--per-shard", "16", "--streams", "6,12", "--runs", "4", "--loss-points", "10",
                    "--out", str(tmp_path / "scale.json")])
    assert json.loads((tmp_path / "scale.json").read_text())["runs"] == 4
    assert r["start"]["first_batch_s"] > 0 and r["resume"]["shards_read"] >= 1
    for a in r["assignment"]:
        assert a["samples_max"] - a["samples_min"] <= 1 and a["whole_shards_round_robin_imbalance"] > 0.1
        assert a["samples_min"] * a["streams"] <= 40 * 16 <= a["samples_max"] * a["streams"]
    assert r["mlflow"]["report_s"] > 0 and r["mlflow"]["search_children_s"] > 0
    assert set(r["met"]) == {"start", "resume", "imbalance", "report"}
