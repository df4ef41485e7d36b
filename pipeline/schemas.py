"""Register the typed configs as the schemas of the YAML in ``configs/``: each primary config names its
schema first in its defaults list, so the composed config is typed and an unknown key fails there.

A launcher registers only its own schema: importing every stage's config module (analysis, report, findings,
sharding, sampling) cost each launch about 5 s of a 2-core CPU before it could even say its input was wrong."""
import importlib

from hydra.core.config_store import ConfigStore

# schema name (as the YAML's defaults list names it) -> "module:class"
SCHEMA_PATHS = {"sweep_schema": "rcdm.config:TrainConfig", "shard_schema": "sharding.config:ShardJob",
                "pretrain_schema": "rcdm.ssl.pretrain:PretrainConfig", "sample_schema": "rcdm.sampling:SampleConfig",
                "analyze_schema": "rcdm.analysis.commands:AnalyzeConfig", "report_schema": "rcdm.report:ReportConfig",
                "findings_schema": "rcdm.findings:FindingsConfig", "retention_schema": "rcdm.retention:RetentionConfig"}


def schema(name: str) -> type:
    module, cls = SCHEMA_PATHS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def register(*names: str) -> None:
    """Store the named schemas (all of them when none is named) in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    for name in names or SCHEMA_PATHS:
        cs.store(name=name, node=schema(name))


def all_schemas() -> dict[str, type]:
    """{schema name: class}, every stage imported: for the config reference and its tests."""
    return {n: schema(n) for n in SCHEMA_PATHS}
