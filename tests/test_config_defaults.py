"""A YAML file in configs/ states only what differs from its schema's dataclass defaults: a value repeated
there would silently override a default later changed in Python (issue 26)."""
from dataclasses import is_dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.schemas import all_schemas

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def primary_configs():
    """(file, schema) for every primary config: those naming a registered schema first in their defaults."""
    out = []
    schemas = all_schemas()
    for path in sorted(CONFIGS.glob("*.yaml")):
        first = (OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or [None])[0]
        if first in schemas:
            out.append((path, schemas[first]))
    return out


def repeats(values, defaults, prefix=""):
    """Dotted keys whose YAML value equals the schema default at the same place."""
    found = []
    for key, value in values.items():
        if key in ("defaults", "hydra") and not prefix or key not in defaults:
            continue
        default = defaults[key]
        if isinstance(value, dict) and isinstance(default, dict):
            found += repeats(value, default, f"{prefix}{key}.")
        elif value == default and not isinstance(default, dict):
            found.append(f"{prefix}{key}: {value!r}")
    return found


def test_every_primary_config_is_found():
    names = {p.stem for p, _ in primary_configs()}
    assert {"sweep", "sample", "analyze", "shard", "report", "pretrain_encoder", "findings"} <= names


@pytest.mark.parametrize("path,schema", primary_configs(), ids=lambda v: getattr(v, "name", ""))
def test_yaml_repeats_no_dataclass_default(path, schema):
    assert is_dataclass(schema)
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    defaults = OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)
    found = repeats(values, defaults)
    assert not found, (f"{path.name} repeats defaults of {schema.__name__}; delete them from the YAML (the "
                       f"dataclass is the one place a default lives): {found}")


def test_the_check_finds_a_repeat():
    from rcdm.config import TrainConfig

    defaults = OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False)
    assert repeats({"train": {"grad_clip": defaults["train"]["grad_clip"], "lr": -1}}, defaults) == [
        f"train.grad_clip: {defaults['train']['grad_clip']!r}"]


def test_the_launchers_share_one_hydra_block():
    """Every launcher's primary config takes configs/hydra/default.yaml (the guard callback, no chdir, its run folder
    named after the config) instead of restating it; only a different run folder stays in the launcher's file."""
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if path.stem in ("sweep", "demo_release"):  # the sweep's own callback and folders; a config, not a launcher
            continue
        assert "hydra: default" in path.read_text(), path.name
        assert set(cfg.get("hydra", {})) <= {"run"} and "GuardCallback" not in path.read_text(), path.name
