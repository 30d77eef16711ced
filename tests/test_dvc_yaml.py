"""dvc.yaml cannot go stale: every module a stage runs is one of its dependencies."""

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGE = REPO / "src" / "fashioncap"


def imported_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """The package's modules that `module` imports, directly or through others (itself included)."""
    seen = set() if seen is None else seen
    if module in seen:
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            for name in names:
                imported_modules(name.split(".")[0], seen)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fashioncap."):
            imported_modules(node.module.split(".")[1], seen)
    return seen


def stage_code_deps(stage: dict) -> set[str]:
    return {Path(d).stem for d in stage["deps"] if d.startswith("src/fashioncap/")}


@pytest.mark.parametrize("name", ["prepare", "train", "evaluate", "report", "register"])
def test_every_module_a_stage_imports_is_a_dependency(name):
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]
    missing = imported_modules(name) - stage_code_deps(stage)
    assert not missing, f"dvc.yaml: stage {name} runs {sorted(missing)} but does not depend on them"


def test_the_check_notices_a_removed_dependency():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]
    stage["deps"] = [d for d in stage["deps"] if d != "src/fashioncap/imaging.py"]
    assert imported_modules("prepare") - stage_code_deps(stage) == {"imaging"}
