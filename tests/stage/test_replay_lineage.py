"""Replay finds the init's training data through its lineage, or stops naming what it looked for."""

import subprocess

import pytest

from fashioncap import replay
from fashioncap.register import register
from tests.conftest import BIN, git, new_run, table

NAME = "fashion-captioner"


def a_repository(root):
    root.mkdir()
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "no results"]):
        git(root, *args)
    return root


def init_of(client, tiny_params, model_dir, data_dir, tags: dict) -> dict:
    run_id = new_run(tiny_params)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    version = register(tiny_params, run_id, model_dir, data_dir, table(1.0))
    return {"kind": "registry", "uri": f"models:/{NAME}/{version}", "run_id": run_id}


def test_an_init_whose_training_data_cannot_be_found_stops_naming_what_was_looked_for(registry_env, tiny_params,
                                                                                        tmp_path):
    client, model_dir, data_dir = registry_env
    repo = a_repository(tmp_path / "repo")
    unrecorded = init_of(client, tiny_params, model_dir, data_dir, {})
    with pytest.raises(replay.ReplayError, match=r"the run of models:/fashion-captioner/1 \(\w+\) recorded no data "
                                                 r"digest \(tag data.digest\).*set data.replay=0"):
        replay.replay_items(unrecorded, 10, 42, repo, set(), client)
    digest = "0123456789abcdef0123456789abcdef.dir"
    uncommitted = init_of(client, tiny_params, model_dir, data_dir, {"data.digest": digest})
    with pytest.raises(replay.ReplayError) as lost:
        replay.replay_items(uncommitted, 10, 42, repo, set(), client)
    said = str(lost.value)
    assert f"trained on prepared data {digest}, and no commit of this repository names it in its dvc.lock" in said
    assert "git add dvc.lock && git commit" in said and "dvc exp pull" in said and "data.replay=0" in said
    # a commit names it, but neither DVC's cache nor a remote holds it
    (repo / "dvc.lock").write_text(f"schema: '2.0'\nstages:\n  prepare:\n    cmd: x\n    outs:\n    - path: "
                                   f"data/prepared\n      hash: md5\n      md5: {digest}\n")
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=repo, check=True, capture_output=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "results")
    with pytest.raises(replay.ReplayError, match=f"the prepared data {digest} that .* trained on .named by commit "
                                                 r"\w+. is neither in DVC's cache nor in its remote"):
        replay.replay_items(uncommitted, 10, 42, repo, set(), client)


def test_the_commit_that_names_the_data_is_one_whose_lock_holds_it_not_one_that_took_it_out(tmp_path):
    repo = a_repository(tmp_path / "repo")
    digest = "fedcba9876543210fedcba9876543210.dir"
    commits = []
    for text in (f"md5: {digest}\n", "md5: 00000000000000000000000000000000.dir\n"):  # named, then replaced
        (repo / "dvc.lock").write_text(text)
        git(repo, "commit", "-qam", "results")
        commits.append(git(repo, "rev-parse", "HEAD"))
    assert replay.commit_holding(digest, repo) == commits[0]
    assert replay.commit_holding("not-there", repo) is None
