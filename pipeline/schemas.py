"""Register the typed configs as the schemas of the YAML in ``configs/``: each primary config names its
schema first in its defaults list, so the composed config is typed and an unknown key fails there."""
from hydra.core.config_store import ConfigStore

from rcdm.analysis.commands import AnalyzeConfig
from rcdm.config import TrainConfig
from rcdm.findings import FindingsConfig
from rcdm.report import ReportConfig
from rcdm.sampling import SampleConfig
from rcdm.ssl.pretrain import PretrainConfig
from sharding.config import ShardJob

SCHEMAS = {"sweep_schema": TrainConfig, "shard_schema": ShardJob, "pretrain_schema": PretrainConfig,
           "sample_schema": SampleConfig, "analyze_schema": AnalyzeConfig, "report_schema": ReportConfig,
           "findings_schema": FindingsConfig}


def register() -> None:
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)
