"""What makes a run's tree dirty: tracked changes outside the pipeline's own outputs, whatever line of
`git status` they are on."""

import subprocess

from fashioncap.lineage import git_state


def test_an_unstaged_pipeline_output_on_the_first_status_line_leaves_the_tree_clean(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "dvc.lock").write_text("a\n")
    (tmp_path / "train.py").write_text("a\n")
    git("add", "-A")
    git("commit", "-qm", "c")
    (tmp_path / "dvc.lock").write_text("b\n")  # " M dvc.lock": the status line starts with a space
    assert git_state(tmp_path)["git.dirty"] == "false"
    (tmp_path / "train.py").write_text("b\n")
    state = git_state(tmp_path)
    assert state["git.dirty"] == "true" and state["git.dirty_paths"] == "train.py"
