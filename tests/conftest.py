"""Shared fixtures: a real S3-API server on 127.0.0.1 with one bucket, stopped even when a test fails."""
import pytest
from servers import moto_s3

from rcdm.storage import StorageOptions, open_fs


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
