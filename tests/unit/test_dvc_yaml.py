"""dvc.yaml cannot go stale: every module a stage runs is one of its dependencies."""

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.unit.test_imports import PACKAGE, imports_of


def imported_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """The package's modules that `module` imports, directly or through others (itself included)."""
    seen = set() if seen is None else seen
    if module in seen:
        return seen
    seen.add(module)
    for name in imports_of(PACKAGE / f"{module}.py", {p.stem for p in PACKAGE.glob("*.py")}):
        imported_modules(name, seen)
    return seen


def stage_code_deps(stage: dict) -> set[str]:
    return {Path(d).stem for d in stage["deps"] if d.startswith("src/fashioncap/")}


def stage_module(stage: dict) -> str:
    import re

    return re.search(r"-m fashioncap\.(\w+)", stage["cmd"])[1]


@pytest.mark.parametrize("name", ["init", "prepare", "train", "evaluate", "report", "register"])
def test_every_module_a_stage_imports_is_a_dependency(name):
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]
    missing = imported_modules(stage_module(stage)) - stage_code_deps(stage)
    assert not missing, f"dvc.yaml: stage {name} runs {sorted(missing)} but does not depend on them"


def test_the_check_notices_a_removed_dependency():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]
    stage["deps"] = [d for d in stage["deps"] if d != "src/fashioncap/imaging.py"]
    assert imported_modules("prepare") - stage_code_deps(stage) == {"imaging"}


def test_every_path_a_stage_uses_is_named_once_in_vars_and_passed_on_its_command_line():
    """Stage modules have no path defaults: a path in a stage's outs or deps that is not in its command
    would be one the module cannot know."""
    import re

    from fashioncap.lineage import pipeline_paths

    text = (REPO / "dvc.yaml").read_text()
    paths = pipeline_paths(text)
    assert len(set(paths.values())) == len(paths)
    literal = [p for p in paths.values() if text.count(p) != 1]
    assert not literal, f"typed more than once in dvc.yaml: {literal}"
    for name, stage in yaml.safe_load(text)["stages"].items():
        used = set(re.findall(r"\$\{paths\.(\w+)\}", yaml.safe_dump({k: stage[k] for k in ("deps", "outs", "metrics")
                                                                       if k in stage})))
        passed = set(re.findall(r"\$\{paths\.(\w+)\}", stage["cmd"]))
        assert used <= passed, f"stage {name} declares {sorted(used - passed)} without passing them"


def test_plots_draw_the_logs_the_train_stage_writes():
    from fashioncap.lineage import pipeline_paths

    text = (REPO / "dvc.yaml").read_text()
    paths = pipeline_paths(text)
    drawn = {file for plot in yaml.safe_load(text)["plots"] for spec in plot.values() for file in spec["y"]}
    assert drawn == {"${paths.train_log}", "${paths.val_log}"} and paths["train_log"].endswith(".csv")
