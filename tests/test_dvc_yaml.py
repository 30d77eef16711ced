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


@pytest.mark.slow
def test_prepare_reruns_when_a_catalogue_photo_or_the_code_it_imports_changes(tmp_path, tiny_raw):
    import csv
    import json

    from PIL import Image

    from tests.conftest import BIN, clone_project, sh

    shop = tmp_path / "shop"
    shop.mkdir()
    rows = []
    for i in range(40):
        Image.new("RGB", (48, 48), (6 * i, 255 - 6 * i, 90)).save(shop / f"p{i}.png")
        rows.append({"file_name": f"p{i}.png", "text": f"a product of colour number {i}"})
    with (shop / "metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "repo").mkdir()
    repo = clone_project(tmp_path / "repo")
    raw = {**tiny_raw, "data": {**tiny_raw["data"], "source": "imagefolder", "path": str(shop), "text_column": "text"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    dvc = str(BIN / "dvc")
    sh([dvc, "repro", "prepare"], repo)

    def changed() -> dict:
        return json.loads(sh([dvc, "status", "prepare", "--json"], repo).stdout)

    assert changed() == {}
    Image.new("RGB", (48, 48), "red").save(shop / "new.png")
    with (shop / "metadata.csv").open("a") as f:
        f.write("new.png,a red product\n")
    assert str(shop) in json.dumps(changed())  # a new photo in the catalogue: prepare is stale
    sh([dvc, "repro", "prepare"], repo)
    assert json.loads((repo / "metrics/prepare.json").read_text())["items"] == 41
    with (repo / "src/fashioncap/imaging.py").open("a") as f:
        f.write("\n# an edit\n")
    assert "src/fashioncap/imaging.py" in json.dumps(changed())  # code prepare runs: stale again
