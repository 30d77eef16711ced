"""The front door and the site: the README stays short and its links resolve; the docs build as a site
with every page, link and anchor resolving (`mkdocs build --strict`); the development page's layout
is the tree."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

README_LINES = 200


def slug(heading: str) -> str:
    """A heading's anchor, as MkDocs (Python-Markdown's toc) and GitHub make it."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def layout_block() -> str:
    text = (REPO / "docs" / "development.md").read_text()
    start = text.index("## Layout")
    return text[start : text.index("```", text.index("```", start) + 3)]


def test_the_readme_is_short_and_every_link_of_it_resolves():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_LINES
    links = re.findall(r"\]\(([^)]+)\)", text)
    local = [link for link in links if not link.startswith("https://")]
    assert len(local) >= 10  # the verbs' pages, the figures, the picture
    for link in local:
        path, _, anchor = link.partition("#")
        assert (REPO / path).exists(), link
        if anchor:
            assert anchor in anchors(REPO / path), link


def test_the_readmes_picture_is_a_real_screenshot():
    from PIL import Image

    with Image.open(REPO / "docs" / "img" / "report.png") as image:
        assert image.width >= 800 and image.height >= 400
        assert len(image.convert("L").getcolors(1 << 16) or []) > 50  # a page with photos, not a blank


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    return subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(site)], cwd=root, capture_output=True,
                          text=True, timeout=300)


def test_the_docs_build_as_a_site_with_every_page_link_and_anchor_resolving(tmp_path):
    import yaml

    proc = mkdocs_build(REPO, tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    pages = [next(iter(entry.values())) for entry in nav]
    assert sorted(pages) == sorted(p.name for p in (REPO / "docs").glob("*.md"))  # no page left out of the nav
    for page in pages:
        built = tmp_path / "site" / ("index.html" if page == "index.md" else page.removesuffix(".md"))
        assert (built if page == "index.md" else built / "index.html").is_file(), page


def test_a_broken_anchor_fails_the_strict_build(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO / "docs", root / "docs")
    shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
    page = root / "docs" / "compare.md"
    page.write_text(page.read_text() + "\nSee [nowhere](registry.md#no-such-section).\n")
    proc = mkdocs_build(root, tmp_path / "site")
    assert proc.returncode != 0 and "no-such-section" in proc.stderr


def test_layout_lists_every_module_of_the_package_and_no_other():
    helpers = {p.stem for p in (REPO / "tests").glob("*.py") if p.stem != "__init__"}  # on the tests/ line
    listed = set(re.findall(r"\b(\w+)\.py\b", layout_block())) - helpers
    modules = {p.stem for p in (REPO / "src" / "fashioncap").glob("*.py") if p.stem != "__init__"}
    assert listed == modules, f"layout: missing {sorted(modules - listed)}, extra {sorted(listed - modules)}"


def test_layout_folders_exist():
    for folder in re.findall(r"^(\S+/)", layout_block(), flags=re.M):
        assert (REPO / folder).is_dir(), folder


@pytest.mark.parametrize("heading, anchor", [("Pinning the kernels (`numerics`)", "pinning-the-kernels-numerics"),
                                             ("GPU: NVIDIA H200 (141 GB), torch 2.11.0+cu130",
                                              "gpu-nvidia-h200-141-gb-torch-2110cu130")])
def test_anchors_are_made_as_the_site_makes_them(heading, anchor):
    assert slug(heading) == anchor


def two_commands(page: Path) -> list[str]:
    """The commands of the page's "# 1." and "# 2." lines (each the line after its comment)."""
    lines = page.read_text().splitlines()
    return [lines[i + 1].strip() for i, line in enumerate(lines) if re.match(r"# [12]\. ", line.strip())]


def test_the_two_commands_are_the_same_everywhere_and_ci_runs_exactly_the_test_command():
    install, test = two_commands(REPO / "README.md")
    assert "pip install -r requirements.lock" in install and "dvc exp run -S profile=offline" in install
    assert "pip install -r requirements-test.lock" in test and test.endswith("pytest")
    for page in ("docs/index.md", "docs/quickstart.md"):
        assert two_commands(REPO / page) == [install, test], page
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == test  # CI ends with the README's test command, as written
    assert any("-r requirements.lock" in line for line in ci) and any("-e ." in line for line in ci)
