"""The front page and docs/ as a reader meets them: short, citing the paper, every link and picture there,
the test line the one CI runs, and the configuration reference generated from the code (issue 26)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(target)
    return bad


def test_every_relative_link_and_picture_exists():
    bad = {p.name: broken_links(p) for p in PAGES}
    assert not {k: v for k, v in bad.items() if v}


def test_the_link_check_catches_a_missing_file_and_anchor(tmp_path):
    (tmp_path / "b.md").write_text("# Only heading\n")
    page = tmp_path / "a.md"
    page.write_text("[x](b.md#only-heading) [y](b.md#nothing) [z](missing.png) [w](https://example.org/x)\n")
    assert broken_links(page) == ["b.md#nothing", "missing.png"]


def test_front_page_is_short_and_cites_the_paper():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 260
    for needed in ("Bordes", "Balestriero", "Vincent", "TMLR 2022", "arxiv.org/abs/2112.09164",
                   "github.com/facebookresearch/RCDM", "github.com/openai/guided-diffusion", "@article"):
        assert needed in text, needed
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_front_page_commands_are_the_two_lines_and_ci_runs_the_second():
    text = (ROOT / "README.md").read_text()
    first = 'pip install -e ".[test]" && python launch/sweep.py -m encoder=vicreg,dino,barlow,simclr level=backbone,projector'
    second = 'pip install -e ".[test]" && python -m pytest -q'
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert block[:2] == [first, second]
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == second


def test_configuration_reference_is_generated_from_the_code():
    from pipeline.reference import render

    assert (ROOT / "docs" / "configuration.md").read_text() == render(), (
        "docs/configuration.md is stale: python -m pipeline.reference > docs/configuration.md")


def test_every_command_in_a_launcher_docstring_composes():
    """The example command lines at the top of each Hydra launcher compose with its primary config (placeholders
    such as <folder> read as a plain value; a sweep's first combination): a renamed key breaks this test, not a user's
    first try (launch/analyze.py once showed keys that no longer parsed)."""
    import ast
    import re

    from hydra import compose, initialize_config_dir

    from pipeline import schemas

    schemas.register()
    root = Path(__file__).resolve().parents[1]
    checked = 0
    for path in sorted((root / "launch").glob("*.py")):
        src = path.read_text()
        name = re.search(r'config_name="(\w+)"', src)
        if not name:
            continue
        doc = re.sub(r"\\\n\s*", " ", ast.get_docstring(ast.parse(src)) or "")
        for line in (ln.strip() for ln in doc.splitlines()):
            if not line.startswith(f"python launch/{path.name}"):
                continue
            line = re.sub(r"<[^>]*>", "x", line.split("#")[0])
            over = [a[1:-1] if a.startswith("[") and a.endswith("]") and not a.split("=", 1)[1].startswith("[") else a
                    for a in line.split()[2:] if "=" in a]
            if " -m " in f" {line} ":  # a sweep: its first combination
                over = [o if o.split("=", 1)[1].startswith("[") else o.split(",")[0] for o in over]
            with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
                compose(name[1], overrides=over)  # raises on a key that does not exist
            checked += 1
    assert checked >= 10
