"""The sharding stage writes the dataset contract of docs/architecture.md, on local paths and on a real S3 server."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from rcdm.encoders import build_encoder
from rcdm.errors import UserError
from sharding.config import ShardJob, SyntheticInput
from sharding.publish import TooManyRejected
from sharding.orchestrate import shard

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(encoders=["vicreg", "dino"], levels=["backbone", "projector"], arch="tiny", encoder_weights="random",
             image_size=32, shard_size=16, batch_size=8, loader_workers=0, synthetic=SyntheticInput(40))


def small_job(output, **kw) -> ShardJob:
    return ShardJob(input="synthetic", output=str(output), **{**SMALL, **kw})


def read_set(root: Path, shard_set: str, shards: list[dict]) -> list[dict]:
    urls = [str(root / shard_set / s["name"]) for s in shards]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_round_trip_with_plain_webdataset(tmp_path):
    out = tmp_path / "ds"
    summary = shard(small_job(out, loader_workers=1))  # decoding in a DataLoader worker process
    manifest = json.loads((out / "manifest.json").read_text())
    split = manifest["splits"]["train"]
    assert summary["samples"] == split["count"] == 40
    assert [s["count"] for s in split["shards"]] == [16, 16, 8]
    assert manifest["encoders"]["dino"]["levels"] == {"backbone": 128, "projector": 64}
    assert manifest["encoders"]["vicreg"]["preprocess"] == {"size": 32, "crop": "center", "normalize": "minus_one_one"}
    assert manifest["flip"] is True and manifest["image_size"] == 32
    images = read_set(out, "images", split["shards"])
    assert len(images) == 40
    for name, enc_manifest in manifest["encoders"].items():
        embs = read_set(out, name, split["shards"])
        assert [e["__key__"] for e in embs] == [s["__key__"] for s in images]  # same keys, same order
        for level, dim in enc_manifest["levels"].items():
            for member in (f"{level}.npy", f"{level}.flip.npy"):
                v = np.load(io.BytesIO(embs[0][member]))
                assert v.shape == (dim,) and v.dtype == np.float16
    first = images[0]
    img = Image.open(io.BytesIO(first["png"]))
    assert img.size == (32, 32) and img.mode == "RGB"
    meta = json.loads(first["json"])
    assert set(meta["factors"]) == {"shape", "colour", "background", "scale", "x", "y", "grayscale"}
    assert int(first["cls"]) == ["circle", "square", "triangle", "cross"].index(meta["factors"]["shape"])
    # the stored embeddings are the encoder's output on this very image and on its mirror
    enc = build_encoder("dino", "tiny", "random")
    x = enc.preprocess(img.convert("RGB"))[None]
    emb = read_set(out, "dino", split["shards"])[0]
    want, want_flip = enc(x)["projector"][0], enc(x.flip(3))["projector"][0]
    assert torch.allclose(torch.from_numpy(np.load(io.BytesIO(emb["projector.npy"]))).float(), want, atol=2e-2)
    assert torch.allclose(torch.from_numpy(np.load(io.BytesIO(emb["projector.flip.npy"]))).float(), want_flip,
                          atol=2e-2)


def test_same_command_same_bytes_and_a_rerun_skips_done_work(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shard(small_job(a))
    shard(small_job(b, loader_workers=2))
    tars = sorted(p.relative_to(a) for p in a.rglob("*.tar"))
    assert len(tars) == 9  # 3 shards x (images + 2 encoders)
    for rel in tars:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    again = shard(small_job(a))
    assert again["processed_now"] == 0 and again["samples"] == 40


def test_an_encoder_added_later_leaves_the_images_alone(tmp_path):
    out = tmp_path / "ds"
    shard(small_job(out, encoders=["vicreg"]))
    before = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.tar")}
    shard(small_job(out, encoders=["simclr"]))
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["encoders"]) == ["simclr", "vicreg"]
    assert {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.tar")} == before
    with pytest.raises(UserError, match="image_size=32"):
        shard(small_job(out, image_size=64))


def test_impossible_requests_fail_before_any_work(tmp_path):
    with pytest.raises(UserError, match="supervised has no projector"):
        shard(small_job(tmp_path / "x", encoders=["supervised"]))
    with pytest.raises(UserError, match="does not exist"):
        shard(ShardJob(input=str(tmp_path / "nowhere"), output=str(tmp_path / "y")))
    assert not (tmp_path / "x").exists()


def _hostile_folder(root: Path) -> dict[str, str]:
    """Every awkward kind of input; returns file name -> what should become of it."""
    root.mkdir()
    Image.new("L", (40, 40), 90).save(root / "gray.png")
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red: must come out white
    rgba.save(root / "rgba.png")
    Image.new("RGB", (40, 40), (0, 200, 0)).convert("P", palette=Image.ADAPTIVE).save(root / "palette.gif")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # red in CMYK
    Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)).save(root / "gray16.png")  # mid-grey, 16 bit
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (60, 30), (10, 10, 200)).save(root / "rotated.jpg", exif=exif.tobytes())
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (50, 50, 50)).save(good, format="JPEG")
    (root / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "garbage.jpg").write_bytes(os.urandom(3000))
    (root / "notes.txt").write_text("not an image")
    Image.new("1", (3000, 3000)).save(root / "bomb.png")  # 9 MP, compresses to almost nothing
    return {"gray.png": "ok", "rgba.png": "ok", "palette.gif": "ok", "cmyk.jpg": "ok", "gray16.png": "ok",
            "rotated.jpg": "ok", "truncated.jpg": "truncated", "empty.png": "empty", "garbage.jpg": "not an image",
            "notes.txt": "not an image", "bomb.png": "decompression bomb"}


def test_hostile_inputs_are_converted_or_rejected_with_a_reason(tmp_path):
    expected = _hostile_folder(tmp_path / "in")
    out = tmp_path / "ds"
    job = ShardJob(input=str(tmp_path / "in"), output=str(out), **{**SMALL, "max_pixels": 4_000_000})
    job.max_rejected_fraction = 0.2
    with pytest.raises(TooManyRejected, match="5 of 11"):
        shard(job)
    assert not (out / "manifest.json").exists()  # nothing published
    job.max_rejected_fraction = 0.5
    summary = shard(job)
    assert summary["samples"] == 6 and summary["rejected"] == 5
    rejected = [json.loads(line) for line in (out / "train-rejected.jsonl").read_text().splitlines()]
    reasons = {Path(r["source"]).name: r["reason"] for r in rejected}
    for name, fate in expected.items():
        if fate != "ok":
            assert fate in reasons[name], (name, reasons.get(name))
    manifest = json.loads((out / "manifest.json").read_text())
    images = {Path(json.loads(s["json"])["source"]).name: s for s in read_set(out, "images", manifest["splits"]["train"]["shards"])}
    assert set(images) == {n for n, f in expected.items() if f == "ok"}

    def centre(name):
        return np.asarray(Image.open(io.BytesIO(images[name]["png"])))[16, 16].tolist()

    assert centre("rgba.png") == [255, 255, 255]
    assert abs(centre("gray16.png")[0] - 128) <= 1 and len(set(centre("gray16.png"))) == 1
    assert centre("gray.png") == [90, 90, 90]
    r, g, b = centre("cmyk.jpg")
    assert r > 200 and g < 60 and b < 60
    assert json.loads(images["rotated.jpg"]["json"])["original_size"] == [30, 60]  # upright: portrait


def test_imagenet_layout_gives_labels(tmp_path):
    for wnid, colour in [("n01440764", (200, 0, 0)), ("n01443537", (0, 0, 200))]:
        (tmp_path / "train" / wnid).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (50, 40), colour).save(tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG")
    out = tmp_path / "ds"
    shard(ShardJob(input=str(tmp_path / "train"), output=str(out), **SMALL))
    manifest = json.loads((out / "manifest.json").read_text())
    samples = read_set(out, "images", manifest["splits"]["train"]["shards"])
    assert [int(s["cls"]) for s in samples] == [0, 0, 0, 1, 1, 1]
    assert json.loads(samples[3]["json"])["label"] == "n01443537"


def _complete_tars(root: Path) -> dict[Path, int]:
    """Every tar under its final name, fully readable, with its sample count."""
    counts = {}
    for p in root.rglob("*.tar"):
        with tarfile.open(p) as tar:
            names = tar.getnames()
        counts[p] = len({n.split(".", 1)[0] for n in names})
    return counts


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_completes_every_input_once(tmp_path):
    out = tmp_path / "ds"
    args = [sys.executable, str(ROOT / "launch" / "shard.py"), f"output={out}", "synthetic.count=600",
            "shard_size=20", "batch_size=20", "loader_workers=1", "encoders=[vicreg,dino]"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((out / "_progress" / "images").glob("*.json"))) < 3:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done_before = len(list((out / "_progress" / "images").glob("*.json")))
    assert 3 <= done_before < 30
    _complete_tars(out)  # any tar under its final name is whole (raises otherwise)

    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "600 samples" in r.stdout
    assert not list(out.rglob("*.tmp-*"))
    manifest = json.loads((out / "manifest.json").read_text())
    samples = read_set(out, "images", manifest["splits"]["train"]["shards"])
    keys = [s["__key__"] for s in samples]
    assert keys == [f"train_{i:08d}" for i in range(600)]  # every input exactly once, in order
    for name in ("vicreg", "dino"):
        assert [s["__key__"] for s in read_set(out, name, manifest["splits"]["train"]["shards"])] == keys


def test_s3_output_and_s3_tar_input_on_a_real_server(tmp_path, s3_bucket):
    endpoint, opts, fs = s3_bucket
    shard(small_job("s3://bucket/demo", storage=opts))
    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file("bucket/demo/manifest.json"))
    assert manifest["splits"]["train"]["count"] == 40
    assert sorted(fs.ls("bucket/demo/images", detail=False)) == [
        f"bucket/demo/images/train-00000{i}.tar" for i in range(3)]
    # the image shards on S3 as the input of another dataset, read by a spawned worker process
    job = ShardJob(input="s3://bucket/demo/images/train-{000000..000002}.tar", output=str(tmp_path / "again"),
                   **{**SMALL, "loader_workers": 1, "encoders": ["simclr"]}, storage=opts)
    again = shard(job)
    assert again["samples"] == 40
    keys = [s["__key__"] for s in read_set(tmp_path / "again", "images",
                                          json.loads((tmp_path / "again" / "manifest.json").read_text())
                                          ["splits"]["train"]["shards"])]
    assert keys == [f"train_{i:08d}" for i in range(40)]


@pytest.mark.slow
def test_default_command_builds_the_demo_dataset(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "shard.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "images/s" in r.stderr + r.stdout  # progress bar and summary
    manifest = json.loads((tmp_path / "data" / "demo" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 2048
    assert sorted(manifest["encoders"]) == ["barlow", "dino", "simclr", "vicreg"]
    assert all(set(e["levels"]) == {"backbone", "projector"} for e in manifest["encoders"].values())


def test_a_slurm_array_task_of_sharding_uses_its_cpus_per_task_in_torch_threads():
    """The SLURM array's entry limits torch to --cpus-per-task before its part runs, as training tasks do (a
    cluster without CPU binding would start one torch thread per node core in every task sharing a node)."""
    code = ("import torch; torch.set_num_threads(4); from sharding import orchestrate; "
            "orchestrate.run_part = lambda job, tasks, part: (torch.get_num_threads(), tasks, part); "
            "print(orchestrate._part_in_slurm_task(None, [3, 5], 1))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_"))}
    def entry(**extra):
        return subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                              check=True, cwd=ROOT).stdout.strip()
    assert entry(SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="2") == "(2, [3, 5], 1)"
    assert entry() == "(4, [3, 5], 1)"  # outside SLURM: the process's own threads
