"""The code's shape: no two modules import each other (directly or round a loop, deferred imports inside
functions included), and every module imports on its own."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rcdm", "sharding", "pipeline")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (``from pkg import sub`` counts as ``pkg.sub``
    when that is a module)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_that_imports_it_back():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    assert cycles(graph) == []


def test_the_walk_finds_a_cycle_where_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports():
    """Every module of the three packages, in a fresh interpreter (the AST walk above finds the loops)."""
    names = sorted(modules())
    r = subprocess.run([sys.executable, "-c", "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module(n)",
                        *names], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def test_rcdm_never_imports_sharding_or_pipeline():
    mods = modules()
    for name, path in mods.items():
        if name.split(".")[0] == "rcdm":
            bad = {m for m in imports_of(name, path, set(mods)) if m.split(".")[0] in ("sharding", "pipeline")}
            assert not bad, (name, bad)


def test_the_encoders_room_imports_nothing_above_it():
    """rcdm.encoders (encoder files, architectures, weights) sits below configs, datasets and sweeps: it imports
    only the house's base modules. Sweep planning that read configs and manifests lived there once (needed.py,
    now pipeline/weights_needed.py) and made the only two arrows that ran back up."""
    base = {"rcdm.errors", "rcdm.preprocess", "rcdm.device", "rcdm.storage", "rcdm.safe_load", "rcdm.stats"}
    mods = modules()
    for name, path in mods.items():
        if name.startswith("rcdm.encoders"):
            up = {m for m in imports_of(name, path, set(mods)) if m.startswith("rcdm.")
                  and not m.startswith("rcdm.encoders") and m not in base}
            assert not up, (name, up)


def test_the_import_walk_sees_every_package():
    assert importlib.util.find_spec("rcdm.model_card") and "rcdm.model_card" in modules()


def test_no_name_is_used_undefined_or_imported_unused(tmp_path):
    """pyflakes' checks (ruff F) over every Python file: a misspelt name inside an ``except`` branch (the sweep's
    report call once read ``writereport_sweep``) otherwise shows only when that branch runs, 50 minutes into CI."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--output-format", "concise",
                        "--no-cache", str(ROOT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    return writereport_sweep()\n")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "F821" in r.stdout, r.stdout + r.stderr  # the check sees what it is for


def test_every_page_the_code_cites_is_in_the_repository():
    """A clone holds the contracts and pages its code points at (they once cited a design page that lived outside
    it)."""
    import re

    cited = set()
    for folder in ("rcdm", "pipeline", "sharding", "launch", "benchmarks", "hydra_plugins", "tests", "configs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".yaml") and path.is_file():
                cited |= {(m, path.relative_to(ROOT)) for m in re.findall(r"\b(?:docs/[\w/.-]+\.md|[A-Z]+\.md)\b",
                                                                           path.read_text())}
    missing = sorted(f"{page} (cited in {where})" for page, where in cited if not (ROOT / page).is_file())
    assert not missing, missing
    assert any(page == "docs/architecture.md" for page, _ in cited)  # the walk sees citations


def test_the_architecture_page_maps_every_module_and_no_module_that_is_gone():
    """docs/architecture.md's map of rooms names every module of the house, and every module it names exists, so the
    map cannot drift from the code (a rename once left a page and two tests pointing at names that had moved)."""
    import re

    page = (ROOT / "docs" / "architecture.md").read_text()
    mapped = set(re.findall(r"^\| `([\w/]+\.py)` \|", page, flags=re.M))
    have = {str(p.relative_to(ROOT)) for folder in ("rcdm", "sharding", "pipeline", "launch", "hydra_plugins")
            for p in (ROOT / folder).rglob("*.py") if p.stat().st_size > 0 and "__pycache__" not in p.parts}
    assert len(mapped) > 60  # the pattern reads the table
    assert not have - mapped, sorted(have - mapped)  # a new module: give it a line in the map
    assert not mapped - have, sorted(mapped - have)  # a module moved or gone: the map follows


def test_library_code_borrows_no_test_tools():
    """rcdm, sharding, pipeline, launch and the launcher plugin never import unittest (mock.patch on os.environ
    once redirected the demo models for the whole process); demo_release.models_from does it in the open."""
    mods = modules()
    for name, path in mods.items():
        tree = ast.parse(Path(path).read_text())
        used = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        used |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "unittest" not in used, name
    for path in [*(ROOT / "launch").glob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]:
        assert "unittest" not in path.read_text(), path
    for path in (ROOT / "benchmarks").glob("*.py"):  # the benchmarks import the installed packages, as users do
        assert "sys.path" not in path.read_text(), path


def test_the_launcher_plugin_patches_no_class_of_submitit_or_hydra():
    """hydra_plugins/rcdm_launcher subclasses hydra-submitit-launcher's launcher and builds its own executor for
    cluster.wait=false; it once swapped submitit.AutoExecutor.map_array for the whole process while it launched."""
    for path in (ROOT / "hydra_plugins").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                if isinstance(t, ast.Attribute):  # an attribute set on something the module did not create
                    root = t
                    while isinstance(root, ast.Attribute):
                        root = root.value
                    assert isinstance(root, ast.Name) and root.id in ("self", "ret"), (path, ast.unparse(t))


def test_code_and_config_comments_say_why_not_which_issue():
    """Issue numbers mean nothing in a clone; the reason and the measurement's page or JSON do."""
    import re

    pattern = re.compile(r"\bissues? #?\d+", re.IGNORECASE)
    for folder in ("rcdm", "pipeline", "sharding", "launch", "benchmarks", "hydra_plugins", "configs"):
        for path in [*(ROOT / folder).rglob("*.py"), *(ROOT / folder).rglob("*.yaml")]:
            assert not pattern.search(path.read_text()), (path, pattern.search(path.read_text()).group())


def test_interval_estimates_live_in_one_module():
    """Wilson intervals and bootstrap percentiles are computed in rcdm/stats.py alone (they were in three files)."""
    import re

    pattern = re.compile(r"def wilson|quantile\(0\.025|percentile\([^)]*2\.5|\b1\.96\b")
    for folder in ("rcdm", "pipeline", "sharding", "launch", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path != ROOT / "rcdm" / "stats.py":
                assert not pattern.search(path.read_text()), path


def test_a_value_with_its_interval_is_written_one_way():
    """rcdm.stats.Estimate.format writes every "value [lo, hi]" (there were four formatters, one per room)."""
    import re

    from rcdm.stats import Estimate

    assert Estimate(0.6123, (0.49, 0.7249)).format() == "0.61 [0.49, 0.72]" and str(Estimate(0.5)) == "0.50"
    assert Estimate.of({"mrr": 0.9, "mrr_ci95": [0.8, 0.95]}, "mrr").format(3) == "0.900 [0.800, 0.950]"
    assert Estimate.of({}, "mrr").format() == "n/a"
    by_hand = re.compile(r"\[\{[^}]*:\.\d+f\}, \{")
    for folder in ("rcdm", "pipeline", "sharding", "launch", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path != ROOT / "rcdm" / "stats.py":
                assert not by_hand.search(path.read_text()), path


def test_the_factor_reader_budget_is_set_once():
    """Every reader_steps default is rcdm.config.READER_STEPS (it was the literal 600 in eight places)."""
    import dataclasses
    import re

    from rcdm.analysis import ANALYSES
    from rcdm.config import READER_STEPS, FactorReadOptions
    from rcdm.findings import FindingsConfig

    for folder in ("rcdm", "pipeline", "launch"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not re.search(r"reader_steps: int = \d", path.read_text()), path
    options = [m.Options for m in ANALYSES.values() if hasattr(m.Options, "reader_steps")]
    assert len(options) >= 4
    for cls in (*options, FactorReadOptions, FindingsConfig):
        assert {f.name: f.default for f in dataclasses.fields(cls)}["reader_steps"] == READER_STEPS, cls


def test_analysis_inputs_are_complete_at_construction():
    """An analysis' Inputs and their Labels (factors, reference, reader) are built whole: nothing assigns a field of
    them afterwards (the evaluation used to fill in factors, reference and reader after construction), and labels
    for another number of images than the inputs hold are refused."""
    import dataclasses
    import re

    import pytest
    import torch

    from rcdm.analysis.base import Inputs, Labels

    fields = "|".join(f.name for cls in (Inputs, Labels) for f in dataclasses.fields(cls) if f.name != "_own")
    target = rf"[a-z_]\w*(?:\.\w+)*\.(?:{fields})"  # an assignment to such a field of anything but self
    late = re.compile(rf"^\s*(?!self\.){target}\s*(?:,\s*{target}\s*)?=(?!=)")
    for folder in ("rcdm", "pipeline", "launch", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                assert not late.search(line), f"{path}: {line}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Labels([{}]).factors = []
    with pytest.raises(ValueError, match="1 images' factors for 2 images"):
        Inputs(None, None, torch.zeros(2, 3, 4, 4), torch.zeros(2, 3), ["a", "b"], None, torch.device("cpu"),
               Labels([{}]))
