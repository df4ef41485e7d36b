"""One table of commands (pipeline.schemas.COMMANDS): every launcher is in it, its schema and primary config exist,
and the command lines its docstring shows still compose, so a renamed key cannot leave a launcher's help behind."""
import re
import shlex
from pathlib import Path

import pytest

from pipeline.schemas import COMMANDS, load

ROOT = Path(__file__).resolve().parents[1]


def test_every_launcher_is_in_the_command_table_with_a_schema_and_a_config():
    launchers = {str(p.relative_to(ROOT)) for p in (ROOT / "launch").glob("*.py")}
    assert launchers == {c.launcher for c in COMMANDS.values()}
    for c in COMMANDS.values():
        assert (ROOT / c.config).is_file() and c.schema_name in (ROOT / c.config).read_text(), c
        load(c.schema)
        if c.options:
            assert c.prefix and load(c.options)


def docstring_commands(launcher: str) -> list[list[str]]:
    """The command lines a launcher's docstring shows for itself: their overrides (continuations joined)."""
    import ast

    doc = ast.get_docstring(ast.parse((ROOT / launcher).read_text())) or ""
    lines = doc.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split(launcher, 1)[1].split("#")[0]) for line in lines if f"python {launcher}" in line]


@pytest.mark.parametrize("name", ["sweep", "plan", "fetch", "status"])
def test_the_sweep_commands_docstring_examples_compose_with_their_own_keys(name):
    from pipeline.command_line import sweep_command

    c = COMMANDS[name]
    examples = docstring_commands(c.launcher)
    assert examples, c.launcher
    for args in examples:
        own = {a.split("=")[0] for a in args if c.prefix and a.startswith(c.prefix + ".")}
        configs = sweep_command(name, args)[0]
        assert configs
        if c.options:
            assert own <= {f"{c.prefix}.{f}" for f in load(c.options).__dataclass_fields__}
        sweep = [a for a in args if re.match(r"^(encoder|level)=.*,", a)]
        want = 1
        for a in sweep:
            want *= len(a.split("=", 1)[1].split(","))
        assert len(configs) == want, (args, len(configs))


def test_sweep_values_expand_in_the_basic_sweepers_order():
    from pipeline.command_line import job_configs

    configs = job_configs(["-m", "encoder=vicreg,dino", "level=backbone,projector"])
    assert [(c.encoder.name, c.level.name) for c in configs] == [
        ("vicreg", "backbone"), ("vicreg", "projector"), ("dino", "backbone"), ("dino", "projector")]
    assert [c.train.steps for c in job_configs(["train.steps=range(10,30,10)"])] == [10, 20]


def test_export_demo_refuses_its_old_spelling_naming_the_new_one():
    import subprocess
    import sys

    from rcdm.errors import UserError

    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import export_demo
    finally:
        sys.path.remove(str(ROOT / "launch"))
    for argv, message in ((["runs/x"], "runs=\\[runs/x\\]"), (["--out", "y"], "out=<folder>"),
                          (["--held-out=8"], "held_out=<images>"), (["--read", "vicreg-backbone"], "read=\\[")):
        with pytest.raises(UserError, match=message):
            export_demo.refuse_old_spelling(argv)
    export_demo.refuse_old_spelling(["runs=[a]", "out=b", "--cfg", "job"])  # the new spelling and Hydra's flags pass
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "export_demo.py"), "--out", "y"], capture_output=True,
                       text=True, timeout=120)  # one line, the CLI's exit status, no traceback
    assert r.returncode == 2 and "out=<folder>" in r.stderr + r.stdout and "Traceback" not in r.stderr


def test_every_other_launchers_docstring_examples_compose():
    """The examples in each launcher's docstring compose against its primary config and type-check against its
    schema (placeholders such as <folder> or ... stand for any value; [key=value] marks an optional key)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline import schemas

    schemas.register()
    checked = 0
    for c in COMMANDS.values():
        if c.config == "configs/sweep.yaml":  # the sweep family: composed per job above
            continue
        import ast

        doc = ast.get_docstring(ast.parse((ROOT / c.launcher).read_text())) or ""
        for line in doc.replace("\\\n", " ").splitlines():
            if f"python {c.launcher}" not in line:
                continue
            text = re.sub(r"<[^>]*>", "x", line.split(c.launcher, 1)[1].split("#")[0]).replace("=...", "=x")
            args = [re.sub(r"^\[(\w[\w.]*=[^\]]*)\]$", r"\1", a) for a in shlex.split(text) if a != "-m"]
            with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
                cfg = compose(Path(c.config).stem, overrides=args)
            OmegaConf.to_object(cfg)  # the schema's types and checks
            checked += 1
    assert checked >= 15
