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
