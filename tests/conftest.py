"""Shared fixtures: the typed configs composed as the launchers compose them, small sharded datasets, and a
real S3-API server on 127.0.0.1 with one bucket (stopped even when a test fails)."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from pipeline.local_servers import moto_s3

from pipeline import schemas
from pipeline.stages import train_config
from rcdm.storage import StorageOptions, open_fs
from sharding.config import ShardJob, SyntheticInput
from sharding.orchestrate import shard

ROOT = Path(__file__).resolve().parents[1]
schemas.register()


def compose_config(name: str, overrides: list[str], return_hydra_config: bool = False):
    """``configs/<name>.yaml`` with ``overrides``, composed by Hydra as its launcher would."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=return_hydra_config)


@pytest.fixture(scope="session")
def compose_sweep():
    """overrides -> the composed sweep config (with Hydra's node, as the sweep callback sees it)."""
    return lambda overrides: compose_config("sweep", overrides, return_hydra_config=True)


@pytest.fixture(scope="session")
def typed():
    """overrides of ``configs/<name>.yaml`` -> the typed object its launcher hands the library."""
    def make(name: str, overrides: list[str]):
        cfg = compose_config(name, overrides, return_hydra_config=name == "sweep")
        return train_config(cfg) if name == "sweep" else OmegaConf.to_object(cfg)
    return make


def build_dataset(path: Path, size: int = 32, train: int = 48, val: int = 8, encoders=("dino",),
                  storage: StorageOptions | None = None, encoder_weights: str = "released") -> str:
    """A small synthetic dataset (train and val splits, 16-image shards) at ``path``."""
    for split, n in (("train", train), ("val", val)):
        shard(ShardJob(input="synthetic", output=str(path), split=split, synthetic=SyntheticInput(n), shard_size=16,
                       image_size=size, encoders=list(encoders), loader_workers=0, encoder_weights=encoder_weights,
                       storage=storage or StorageOptions()))
    return str(path)


@pytest.fixture(scope="session")
def make_dataset():
    return build_dataset


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> str:
    """48 + 8 synthetic images embedded by the tiny DINO: the training tests' dataset (read-only)."""
    return build_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture
def s3_bucket(tmp_path, monkeypatch):
    """(endpoint URL, StorageOptions, filesystem) with an empty bucket named "bucket"."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)  # dummy credentials: the server accepts any
    with moto_s3(tmp_path / "moto.log") as endpoint:
        opts = StorageOptions(endpoint_url=endpoint)
        fs, _ = open_fs("s3://bucket", opts)
        fs.mkdir("bucket")
        yield endpoint, opts, fs
