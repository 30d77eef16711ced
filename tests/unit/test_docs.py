"""The README's layout section is the tree: every module listed exists, every module is listed."""

import re

from tests.conftest import REPO


def layout_block() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Layout")
    return text[start : text.index("```", text.index("```", start) + 3)]


def test_layout_lists_every_module_of_the_package_and_no_other():
    listed = set(re.findall(r"\b(\w+)\.py\b", layout_block())) - {"conftest", "services"}  # tests/ files
    modules = {p.stem for p in (REPO / "src" / "fashioncap").glob("*.py") if p.stem != "__init__"}
    assert listed == modules, f"README layout: missing {sorted(modules - listed)}, extra {sorted(listed - modules)}"


def test_layout_folders_exist():
    for folder in re.findall(r"^(\S+/)", layout_block(), flags=re.M):
        assert (REPO / folder).is_dir(), folder
