"""The suite is independent of what a pipeline run left in the checkout: a test's project holds the code as it
stands and never a run's state (conftest.RUN_STATE)."""

import hashlib
import re
import shutil
from pathlib import Path

import yaml

from tests.conftest import REPO, RUN_STATE, as_the_offline_run_leaves_it, copy_project, git, is_run_state


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".git" not in p.relative_to(root).parts}


def checkout(dest: Path) -> Path:
    """A git checkout of the project as a clean clone has it."""
    copy_project(REPO, dest)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "clean"]):
        git(dest, *args)
    return dest


def pipeline_outputs() -> list[str]:
    """Every output dvc.yaml's stages declare (outs, metrics, plots), resolved from its paths, and the checkpoints
    train keeps outside DVC."""
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    paths = pipeline["vars"][0]["paths"]
    declared = [next(iter(entry)) if isinstance(entry, dict) else entry for stage in pipeline["stages"].values()
                for kind in ("outs", "metrics", "plots") for entry in stage.get(kind, [])]
    resolved = [re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m[1]], name) for name in declared]
    return [*resolved, paths["checkpoints"]]


def a_run(root: Path) -> Path:
    """What a pipeline run writes, by dvc.yaml's outputs (a folder gets a file inside), each with content of its own."""
    outputs = [p if Path(p).suffix else f"{p}/part-0" for p in pipeline_outputs()]
    for name in [*outputs, "dvc.lock", "mlflow.db", "mlruns/0/meta.yaml"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"written by a run: {name}\n")
    return root


def test_every_output_of_the_pipeline_is_run_state():
    outputs = pipeline_outputs()
    assert len(outputs) > 10 and all(is_run_state(p) for p in outputs), [p for p in outputs if not is_run_state(p)]
    assert not is_run_state("data/corrections/README.md") and not is_run_state("conf/attributes.yaml")  # inputs
    assert all(re.fullmatch(r"[\w.]+(/[\w.]+)*/?", name) for name in RUN_STATE)


def test_a_checkout_as_the_offline_run_leaves_it_gives_the_tests_the_same_project(tmp_path):
    clean = checkout(tmp_path / "clean")
    used = as_the_offline_run_leaves_it(checkout(tmp_path / "used"), a_run(tmp_path / "run"))
    (used / "metrics" / "README.md").write_text("a run's notes\n")  # tracked run state changed in the work tree
    status = git(used, "status", "--porcelain")
    assert "M  params.yaml" in status and "A  dvc.lock" in status  # staged, as `dvc exp run` leaves them
    assert tree(copy_project(used, tmp_path / "from-used")) == tree(copy_project(clean, tmp_path / "from-clean"))
    projected = tree(tmp_path / "from-used")
    assert "metrics/README.md" in projected and "dvc.lock" not in projected and "mlflow.db" not in projected


def test_a_developers_uncommitted_change_is_tested(tmp_path):
    used = checkout(tmp_path / "used")
    module = used / "src" / "fashioncap" / "captions.py"
    module.write_text(module.read_text() + "\n# changed, not committed\n")
    (used / "tests" / "unit" / "test_new.py").write_text("def test_new():\n    assert True\n")
    copied = copy_project(used, tmp_path / "project")
    assert (copied / "src/fashioncap/captions.py").read_text().endswith("# changed, not committed\n")
    assert (copied / "tests/unit/test_new.py").is_file()
    shutil.rmtree(used / "docs")  # a file deleted in the work tree is not copied either
    assert not (copy_project(used, tmp_path / "again") / "docs").exists()
