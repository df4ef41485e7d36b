"""Hostile and damaged data: inputs that would exhaust memory, hang, or publish a dataset training cannot read
are rejected one by one with their reason; a dataset altered or damaged after sharding is refused where it is
read, with one line naming the shard and the fix."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcdm.data import TrainStream, heldout, open_dataset, paired_samples
from rcdm.errors import DatasetError, UserError
from rcdm.manifest import read_manifest
from sharding.config import ShardJob, SyntheticInput
from sharding.decode import Rejected, decode
from sharding.orchestrate import shard

ROOT = Path(__file__).resolve().parents[1]
# the peak memory of this process alone, in MB (ru_maxrss would carry the forking pytest process's over exec)
PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024"
TINY = dict(encoders=["dino"], levels=["backbone"], arch="tiny", encoder_weights="random", image_size=32,
            shard_size=64, batch_size=8, loader_workers=0)


def png(colour: str, size: int = 40, noise: bool = False) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (size, size), colour)
    if noise:  # incompressible: the PNG is as large as its pixels
        img = Image.fromarray(np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8))
    img.save(buf, format="PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", **info) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in info.items():
        setattr(ti, k, v)
    tar.addfile(ti, io.BytesIO(data) if data else None)


def hostile_tar(path: Path) -> Path:
    """Two good samples and one of every kind of member a shard must not take."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "good1.png", png("red"))
        add(tar, "link.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tar, "hard.png", type=tarfile.LNKTYPE, linkname="good1.png")
        add(tar, "fifo.png", type=tarfile.FIFOTYPE)
        add(tar, "dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add(tar, "twice.png", png("blue"))
        add(tar, "twice.png", png("green"))
        add(tar, "x/a.png", png("yellow"))
        add(tar, "x_a.png", png("purple"))  # the same key once sanitised
        add(tar, "good2.png", png("white"))
    return path


def rejected(out: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}-rejected.jsonl").read_text().splitlines()]


def readable(out: Path, encoder: str = "dino") -> int:
    """Every sample of the dataset read as training reads it (shards verified); returns how many."""
    info = open_dataset(str(out), encoder, "backbone")
    return sum(1 for shard in info.shards for _ in paired_samples(info, shard))


def test_a_tar_of_links_devices_fifos_repeats_and_colliding_keys_publishes_only_what_training_reads(tmp_path):
    out = tmp_path / "ds"
    summary = shard(ShardJob(input=str(hostile_tar(tmp_path / "in.tar")), output=str(out), max_rejected_fraction=0.9,
                             **TINY))
    reasons = {r["source"].split("#")[-1]: r["reason"] for r in rejected(out)}
    assert summary["samples"] == 3 and readable(out) == 3  # good1, x/a (the first of the colliding pair), good2
    assert "a symbolic link" in reasons["link"] and "a hard link" in reasons["hard"]
    assert "a FIFO" in reasons["fifo"] and "a character device" in reasons["dev"]
    assert "appears twice" in reasons["twice"] and "which sample 'x/a' of this tar already took" in reasons["x_a"]


def test_a_sparse_member_claiming_gigabytes_is_rejected_unread(tmp_path):
    gnu_tar = shutil.which("tar")
    assert gnu_tar, "GNU tar writes the sparse member"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png("red"))
    with open(src / "b.png", "wb") as f:  # 2 GiB of holes: a few KB in the tar
        f.truncate(2 * 2 ** 30)
    subprocess.run([gnu_tar, "--sparse", "--format=gnu", "-cf", str(tmp_path / "in.tar"), "a.png", "b.png"],
                   cwd=src, check=True)
    assert (tmp_path / "in.tar").stat().st_size < 1_000_000
    out = tmp_path / "ds"
    probe = (f"from sharding.config import ShardJob; from sharding.orchestrate import shard; "
             f"shard(ShardJob(input={str(tmp_path / 'in.tar')!r}, output={str(out)!r}, max_rejected_fraction=0.9, "
             f"**{TINY!r})); print({PEAK})")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    peak_mb = int(r.stdout.split()[-1])
    assert peak_mb < 1500, f"{peak_mb:.0f} MB peak: the sparse member was read"
    (reason,) = [x["reason"] for x in rejected(out)]
    assert "sparse file claiming 2147483648 bytes" in reason and readable(out) == 1


def test_a_fifo_a_device_link_and_an_oversized_file_in_a_folder_are_rejected_without_reading(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png("red"))
    (folder / "b.png").write_bytes(png("blue"))
    os.mkfifo(folder / "pipe.png")  # reading it would block forever
    os.symlink("/dev/zero", folder / "zero.png")  # endless
    os.symlink(folder, folder / "loop")  # a folder link back to itself
    (folder / "big.png").write_bytes(b"\0" * 5000)
    out = tmp_path / "ds"
    summary = shard(ShardJob(input=str(folder), output=str(out), max_member_bytes=4000, max_rejected_fraction=0.9,
                             **TINY))
    reasons = {Path(r["source"]).name: r["reason"] for r in rejected(out)}
    assert summary["samples"] == 2 and readable(out) == 2
    assert "a FIFO" in reasons["pipe.png"] and "a link to a character device" in reasons["zero.png"]
    assert "a link to a folder" in reasons["loop"] and "more than max_member_bytes=4000" in reasons["big.png"]


def test_a_truncated_tar_keeps_its_whole_samples_and_names_the_cut(tmp_path):
    path = tmp_path / "in.tar"
    with tarfile.open(path, "w") as tar:
        for i, colour in enumerate(["red", "blue", "green"]):
            add(tar, f"s{i}.png", png(colour, 200, noise=True))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * 0.8)])  # ends inside the last member (each is 120 KB)
    out = tmp_path / "ds"
    summary = shard(ShardJob(input=str(path), output=str(out), max_rejected_fraction=0.9, **TINY))
    (cut,) = rejected(out)
    assert summary["samples"] == 2 and readable(out) == 2
    assert str(path) in cut["reason"] and "truncated or corrupt after s1.png" in cut["reason"]


def test_pil_follows_max_pixels_and_16_bit_images_stay_small(tmp_path):
    wide = Image.new("L", (95_000_000, 1))  # past PIL's own 89.5 MP limit, within ours
    buf = io.BytesIO()
    wide.save(buf, format="PNG")
    assert decode(buf.getvalue(), max_pixels=100_000_000).size == (95_000_000, 1)
    with pytest.raises(Rejected, match="decompression bomb"):
        decode(buf.getvalue(), max_pixels=90_000_000)
    # a 16-bit image of 40 MP: rescaled a band at a time (the old code made float64 copies: ~1.4 GB)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((5000, 8000), 40000, dtype=np.uint16)).save(deep)
    probe = (f"from sharding.decode import decode; img = decode(open({str(deep)!r}, 'rb').read()); "
             f"print(img.getpixel((0, 0)), {PEAK})")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    pixel, peak_mb = r.stdout.split(")")[0] + ")", int(r.stdout.split()[-1])
    assert pixel == "(156, 156, 156)" and peak_mb < 600, r.stdout  # 40000 / 65535 * 255 = 155.6


# ---- a dataset damaged or altered after sharding -------------------------------------------------------------

@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "ds"
    for split, n in (("train", 24), ("val", 4)):
        shard(ShardJob(input="synthetic", output=str(out), split=split, synthetic=SyntheticInput(n, 0),
                       **{**TINY, "shard_size": 8}))
    return out


@pytest.fixture
def copy(clean, tmp_path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(clean, out)
    return out


def edit_manifest(ds: Path, change) -> None:
    m = json.loads((ds / "manifest.json").read_text())
    change(m)
    (ds / "manifest.json").write_text(json.dumps(m))


def first_batches(ds: Path, steps: int = 4) -> None:
    info = open_dataset(str(ds), "dino", "backbone")
    batches = iter(TrainStream(info, 8, 0, 1, seed=0))
    for _ in range(steps):
        next(batches)


def test_the_manifest_records_a_sha256_per_shard_and_the_clean_dataset_reads(clean):
    m = read_manifest(str(clean))
    assert all(set(s["sha256"]) == {"images", "dino"} for s in m.splits["train"].shards)
    first_batches(clean)
    assert readable(clean) == 24


@pytest.mark.parametrize("case, fault", [
    ("inflated count", lambda m: (m["splits"]["train"]["shards"][0].update(count=9),
                                  m["splits"]["train"].update(count=25))),
    ("counts that do not add up", lambda m: m["splits"]["train"].update(count=99)),
    ("zero count", lambda m: (m["splits"]["train"]["shards"][0].update(count=0),
                              m["splits"]["train"].update(count=16))),
    ("a shard outside", lambda m: m["splits"]["train"]["shards"][0].update(name="../../../etc/passwd")),
    ("an absolute shard", lambda m: m["splits"]["train"]["shards"][0].update(name="/etc/passwd")),
    ("an encoder outside", lambda m: m["encoders"].update({"../x": m["encoders"]["dino"]})),
    ("negative dims", lambda m: m["encoders"]["dino"]["levels"].update(backbone=-3)),
    ("a missing key", lambda m: m.pop("image_size")),
    ("a wrong type", lambda m: m["splits"]["train"].update(shards="many")),
])
def test_an_altered_manifest_is_refused_naming_what_and_the_fix(copy, case, fault):
    edit_manifest(copy, fault)
    with pytest.raises(UserError) as e:
        first_batches(copy, steps=3)  # 3 batches of 8: the first shard read to its end
    msg = str(e.value)
    assert "\n" not in msg and ("launch/shard.py" in msg or "rebuild" in msg), msg


def test_wrong_dims_in_the_manifest_name_the_sample(copy):
    edit_manifest(copy, lambda m: m["encoders"]["dino"]["levels"].update(backbone=7))
    with pytest.raises(DatasetError, match=r"train-00000\d.tar#.*has shape \(128,\), not \(7,\)"):
        first_batches(copy)


def test_bad_manifest_json_is_one_line(copy):
    (copy / "manifest.json").write_text('{"image_size": 32, ')
    with pytest.raises(UserError, match=r"manifest.json is not a valid rcdm dataset manifest \(not JSON"):
        open_dataset(str(copy), "dino", "backbone")


@pytest.mark.parametrize("damage", ["cut", "deleted", "flipped byte", "out of step"])
def test_a_damaged_shard_is_named(copy, damage):
    shard_file = copy / "images" / "train-000001.tar"
    data = shard_file.read_bytes()
    if damage == "cut":
        shard_file.write_bytes(data[:len(data) // 2])
    elif damage == "deleted":
        shard_file.unlink()
    elif damage == "flipped byte":  # inside a PNG's pixel data: the tar still parses
        at = data.index(b"IDAT") + 20
        shard_file.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    else:
        shutil.copy(copy / "images" / "train-000000.tar", shard_file)  # other keys than its embeddings
    with pytest.raises(DatasetError) as e:
        first_batches(copy, steps=3)
    assert "train-000001.tar" in str(e.value) and "rebuild" in str(e.value) and "\n" not in str(e.value)


def test_a_corrupt_image_in_an_old_manifest_without_checksums_names_its_sample(copy):
    edit_manifest(copy, lambda m: [s.pop("sha256") for s in m["splits"]["train"]["shards"]])
    shard_file = copy / "images" / "train-000000.tar"
    data = bytearray(shard_file.read_bytes())
    at = data.index(b"IDAT") + 8
    data[at:at + 40] = b"\0" * 40
    shard_file.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"sample train-000000.tar#\S+ of .* cannot be read"):
        first_batches(copy, steps=3)


def test_training_on_a_damaged_dataset_is_one_error_line(copy, tmp_path):
    """Through the launcher, with loader workers: the worker's error reaches the console as one line, exit 2,
    and the job's MLflow run ends FAILED (the image shard: the embedding statistics read before the run starts do
    not touch it)."""
    shard_file = copy / "images" / "train-000002.tar"
    shard_file.write_bytes(shard_file.read_bytes()[:3000])
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "encoder=dino", "level=backbone",
                        "data=shards", f"data.url={copy}", f"storage.run_root={tmp_path / 'runs'}",
                        f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "train.steps=8", "train.batch_size=8",
                        "train.loader_workers=1", "faithfulness.images=0", "invariance.images=0", "grid.images=2",
                        "grid.steps=ddim2", "diagnostic.images=0"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert "images/train-000002.tar" in errors[0] and "Traceback" not in r.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [run.info.status for run in runs] == ["FAILED"]


def test_heldout_reads_only_what_it_needs(clean):
    info = open_dataset(str(clean), "dino", "backbone", "val")
    x, h, keys = heldout(info, 2)
    assert x.shape == (2, 3, 32, 32) and h.shape == (2, 128) and len(keys) == 2


def test_the_empty_shard_checksum_is_what_sharding_writes():
    import hashlib

    from rcdm.manifest import EMPTY_SHARD_SHA256
    from sharding.writer import tar_bytes

    assert hashlib.sha256(tar_bytes([])).hexdigest() == EMPTY_SHARD_SHA256
