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


# the sweep's group options, each composed on its own: a value in one that equals its dataclass default changes
# nothing unless something composed before it set another. Recipe files are exempt: each states its whole recipe,
# so that a dataclass default changed later never changes a released recipe (recipe=adm stays the official one);
# so are an option's own name (model=tiny is the tiny model whatever the default becomes) and ??? (must be given).
GROUP_OPTIONS = [(group, p.stem) for group in ("cluster", "data", "tracking", "storage", "model", "encoder", "level",
                                               "experiment") for p in sorted((CONFIGS / group).glob("*.yaml"))]


def _composed(configs: Path, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from pipeline import schemas

    schemas.register("sweep_schema")
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return OmegaConf.to_container(compose("sweep", overrides=overrides), resolve=False)


def _without(values: dict, dotted: str) -> dict:
    out = dict(values)
    head, _, rest = dotted.partition(".")
    if rest:
        out[head] = _without(out[head], rest)
    else:
        out.pop(head)
    return out


def group_repeats(group: str, option: str, configs: Path = CONFIGS) -> list[str]:
    """The keys of configs/<group>/<option>.yaml equal to their TrainConfig default whose removal leaves the sweep
    composed with that option exactly as it is."""
    import shutil
    import tempfile

    from rcdm.config import TrainConfig

    path = configs / group / f"{option}.yaml"
    text = path.read_text()
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    glob = "@package _global_" in text
    found = repeats(values if glob else {group: values}, OmegaConf.to_container(OmegaConf.structured(TrainConfig),
                                                                                resolve=False))
    overrides = [f"{group}={option}"] + (["data.url=x"] if (group, option) == ("data", "shards") else [])
    keys = [f.split(":")[0] for f in found if not f.split(":")[0].endswith(".name") and not f.endswith("'???'")]
    if not keys:
        return []
    want = _composed(configs, overrides)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "configs"
        shutil.copytree(configs, copy)
        for key in keys:
            trimmed = _without(values, key if glob else key.split(".", 1)[1])
            header = "".join(line + "\n" for line in text.splitlines() if line.startswith("# @package"))
            (copy / group / f"{option}.yaml").write_text(header + OmegaConf.to_yaml(OmegaConf.create(trimmed)))
            if _composed(copy, overrides) == want:
                out.append(key)
            (copy / group / f"{option}.yaml").write_text(text)
    return out


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=lambda v: v)
def test_group_files_repeat_no_dataclass_default(group, option):
    found = group_repeats(group, option)
    assert not found, (f"configs/{group}/{option}.yaml repeats defaults of TrainConfig that change nothing once "
                       f"composed; delete them (rcdm/config.py is the one place a default lives): {found}")


def test_the_group_check_finds_a_repeat_and_keeps_what_matters(tmp_path):
    import shutil

    shutil.copytree(CONFIGS, tmp_path / "configs")
    cluster = tmp_path / "configs" / "cluster" / "local.yaml"
    text = cluster.read_text()
    assert "\ncluster:\n" in text
    cluster.write_text(text.replace("\ncluster:\n", "\ncluster:\n  mem_gb: 32\n", 1))  # TrainConfig's default: a repeat
    assert group_repeats("cluster", "local", tmp_path / "configs") == ["cluster.mem_gb"]
