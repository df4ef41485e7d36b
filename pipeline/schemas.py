"""The table of rcdm's commands (``COMMANDS``: launcher, primary YAML, schema, own keys), and the typed configs
registered as the schemas of the YAML in ``configs/``: each primary config names its schema first in its defaults
list, so the composed config is typed and an unknown key fails there.

A launcher registers only its own schema: importing every stage's config module (analysis, report, findings,
sharding, sampling) cost each launch about 5 s of a 2-core CPU before it could even say its input was wrong."""
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hydra.core.config_store import ConfigStore


@dataclass(frozen=True)
class Command:
    """One command: its launcher, its primary YAML in ``configs/``, the schema that YAML names first in its defaults
    list (``module:class``), and for the commands that read a sweep without launching it, their own keys' prefix and
    dataclass (``pipeline.command_line``)."""
    launcher: str
    config: str
    schema_name: str
    schema: str
    prefix: str = ""
    options: str = ""


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# every command of rcdm: the schemas, the configuration reference (pipeline/reference.py) and the tests read this
COMMANDS = {
    "sweep": Command("launch/sweep.py", "configs/sweep.yaml", "sweep_schema", "rcdm.config:TrainConfig"),
    "plan": Command("launch/plan.py", "configs/sweep.yaml", "sweep_schema", "rcdm.config:TrainConfig",
                    "plan", "rcdm.cost:PlanOptions"),
    "fetch": Command("launch/fetch_weights.py", "configs/sweep.yaml", "sweep_schema", "rcdm.config:TrainConfig",
                     "fetch", "pipeline.weights_needed:FetchOptions"),
    "status": Command("launch/status.py", "configs/sweep.yaml", "sweep_schema", "rcdm.config:TrainConfig"),
    "shard": Command("launch/shard.py", "configs/shard.yaml", "shard_schema", "sharding.config:ShardJob"),
    "sample": Command("launch/sample.py", "configs/sample.yaml", "sample_schema", "rcdm.sampling:SampleConfig"),
    "analyze": Command("launch/analyze.py", "configs/analyze.yaml", "analyze_schema",
                       "rcdm.analysis.commands:AnalyzeConfig"),
    "report": Command("launch/report.py", "configs/report.yaml", "report_schema", "rcdm.report:ReportConfig"),
    "findings": Command("launch/demo_findings.py", "configs/findings.yaml", "findings_schema",
                        "rcdm.findings:FindingsConfig"),
    "pretrain": Command("launch/pretrain_encoder.py", "configs/pretrain_encoder.yaml", "pretrain_schema",
                        "rcdm.ssl.pretrain:PretrainConfig"),
    "export": Command("launch/export_demo.py", "configs/export_demo.yaml", "export_schema",
                      "rcdm.demo_release:ExportConfig"),
    "retention": Command("launch/retention.py", "configs/retention.yaml", "retention_schema",
                         "rcdm.retention:RetentionConfig"),
}
# schema name (as the YAML's defaults list names it) -> "module:class"
SCHEMA_PATHS = {c.schema_name: c.schema for c in COMMANDS.values()}


def load(path: str) -> type:
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


def schema(name: str) -> type:
    return load(SCHEMA_PATHS[name])


def register(*names: str) -> None:
    """Store the named schemas (all of them when none is named) in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    for name in names or SCHEMA_PATHS:
        cs.store(name=name, node=schema(name))


def all_schemas() -> dict[str, type]:
    """{schema name: class}, every stage imported: for the config reference and its tests."""
    return {n: schema(n) for n in SCHEMA_PATHS}


def hydra_app(name: str, run: Callable[[Any], Any], show: Callable[[Any, Any], None] | None = None):
    """The Hydra app of command ``name`` (``COMMANDS``), the one way a launcher is made: its schema registered, its
    primary config composed and typed, ``run(typed config)`` with any UserError as one line, then ``show(result,
    typed config)`` to print what was done. Hydra names the job after the launcher (its log file, its folder)."""
    import hydra
    from omegaconf import OmegaConf

    from rcdm.errors import cli_errors

    command = COMMANDS[name]
    register(command.schema_name)

    def task(cfg) -> None:
        with cli_errors():
            typed = OmegaConf.to_object(cfg)
            out = run(typed)
            if show:
                show(out, typed)

    task.__module__ = Path(command.launcher).stem  # Hydra's job name: the launcher's, as when it held the function
    return hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name=Path(command.config).stem)(task)
