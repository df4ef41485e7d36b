"""The command line of the commands that read a sweep without launching it (``launch/plan.py``,
``launch/fetch_weights.py``, ``launch/status.py``): the sweep's own overrides, composed for every job exactly as
``launch/sweep.py`` composes them, plus the command's own keys under its prefix (``plan.device=H100``), typed by
the command's options dataclass (``pipeline.schemas.COMMANDS``) and read through OmegaConf like any other key:
a key the dataclass lacks, or a value of the wrong type, is one error naming the keys there are.

A sweep override (``encoder=vicreg,dino``, ``range(...)``) is expanded here with Hydra's public override API into
the same combinations, in the same order, as the basic sweeper launches."""
from __future__ import annotations

import dataclasses
import itertools

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rcdm.config import TrainConfig
from rcdm.errors import UserError


def combinations(overrides: list[Override]) -> list[list[str]]:
    """Every job's overrides of a sweep command line: the product of the sweep overrides' values, the first varying
    slowest (the basic sweeper's order: ``encoder=a,b level=x,y`` -> a-x, a-y, b-x, b-y)."""
    lists = []
    for o in overrides:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise UserError(f"{o.input_line}: an interval sweep has no list of values to launch; give the values "
                                f"(a,b,c) or range(start,stop,step)")
            lists.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            lists.append([f"{key}={o.get_value_element_as_str()}"])
    return [list(c) for c in itertools.product(*lists)]


def _fail(e: Exception) -> UserError:
    return UserError(f"the overrides do not compose: {' '.join(str(e).split())[:400]}")


def command_options(prefix: str, options: type, overrides: list[Override]):
    """The command's own keys (``<prefix>.<field>=value``) as an instance of the ``options`` dataclass."""
    node = OmegaConf.structured(options)
    names = ", ".join(f"{prefix}.{f.name}" for f in dataclasses.fields(options))
    for o in overrides:
        key = o.get_key_element().removeprefix(f"{prefix}.")
        if o.is_sweep_override() or o.is_delete():
            raise UserError(f"{o.input_line}: {prefix}.<key> takes one value ({prefix}.<key>=<value>); this command's "
                            f"own keys are {names}")
        try:
            OmegaConf.update(node, key, o.value(), merge=False)
        except OmegaConfBaseException as e:
            what = "unknown key" if "not in" in str(e) or "struct" in str(e) else "a value of the wrong type"
            raise UserError(f"{o.input_line}: {what} ({' '.join(str(e).split()[:12])}); this command's own keys are "
                            f"{names}") from None
    return OmegaConf.to_object(node)


def sweep_command(name: str, args: list[str]) -> tuple[list[TrainConfig], object | None]:
    """(every job's config, the command's own options or None) of command ``name``'s command line: its own keys'
    prefix and dataclass come from ``pipeline.schemas.COMMANDS``."""
    from pipeline.schemas import COMMANDS, load

    c = COMMANDS[name]
    return _read(args, c.prefix, load(c.options) if c.options else None)


def job_configs(args: list[str]) -> list[TrainConfig]:
    """Every job's config of a sweep command line (its overrides, with or without -m), composed as launch/sweep.py
    composes them, without launching anything."""
    return _read(args, "", None)[0]


def _read(args: list[str], prefix: str, options: type | None) -> tuple[list[TrainConfig], object | None]:
    from hydra import compose, initialize_config_dir

    from pipeline import schemas
    from pipeline.stages import train_config
    from rcdm.provenance import REPO

    schemas.register("sweep_schema")
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if a not in ("-m", "--multirun")])
    except (HydraException, OmegaConfBaseException) as e:
        raise _fail(e) from None
    own = [o for o in parsed if prefix and o.get_key_element().split(".")[0] == prefix]
    opts = command_options(prefix, options, own) if options else None
    try:
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            configs: list[TrainConfig] = [train_config(compose("sweep", overrides=c))
                                          for c in combinations([o for o in parsed if o not in own])]
    except (HydraException, OmegaConfBaseException) as e:  # a key that does not exist, a value of the wrong type
        raise _fail(e) from None
    return configs, opts
