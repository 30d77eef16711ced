"""Reproduce a result from its git commit or DVC experiment; lineage; DVC remote round trip."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from fashioncap import fingerprint
from fashioncap.reproduce import Progress, ReproduceError, Rule, Target, compare, report, resolve, weights_verdict
from tests.conftest import BIN, TINY_OVERRIDES, copy_repo, git, pending, set_args, sh, train_command

pytestmark = pytest.mark.slow


def client_of(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def older_cpu() -> dict[str, str]:
    """What a CPU one kernel family below this one computes with: AVX2 on an AVX-512 machine, no vector
    kernels on an AVX2 one."""
    if fingerprint.supports("avx512", set(fingerprint.cpu_info()["flags"].split())):
        return {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    return {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}


@pytest.fixture(scope="module")
def history(tiny_repo, tmp_path_factory):
    """A copy of the committed tiny pipeline run (plain `dvc repro`), then an experiment with another
    learning rate and this CPU's own kernels (`numerics.cpu_kernels=native`), run as an older CPU would
    (one kernel family lower); and, beside it, the same training with this CPU's kernels."""
    repo = copy_repo(tiny_repo, tmp_path_factory.mktemp("repro") / "repo")
    first_run = json.loads((repo / "models/run.json").read_text())["run_id"]
    # with Hydra, -S composes params.yaml afresh from conf/: name the tiny overrides again
    sh([str(BIN / "dvc"), "exp", "run", "-n", "faster",
        *set_args([*TINY_OVERRIDES, "train.lr=0.003", "numerics.cpu_kernels=native"])], repo, **older_cpu())
    second_run = json.loads((repo / "models/run.json").read_text())["run_id"]
    # the same training on this CPU's kernels: the older CPU's weights must differ, or pinning proves nothing
    native = tmp_path_factory.mktemp("native")
    sh(train_command(native, repo / "params.yaml", repo / "data/prepared"), repo,
       MLFLOW_TRACKING_URI=f"sqlite:///{native / 'mlflow.db'}")  # not a run of the repository's store
    weights = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (repo / "models/best",
                                                                                              native / "best")]
    return repo, first_run, second_run, weights[0] != weights[1]


def reproduce(repo: Path, ref: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fashioncap"), "reproduce", ref], cwd=repo, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})


def workspace_state(repo: Path) -> tuple[str, str, str]:
    return (git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain"),
            (repo / "metrics/eval.json").read_text())


def test_every_run_records_commit_dirty_flag_data_digest_and_lineage_artifacts(history):
    repo, first_run, second_run, _ = history
    client = client_of(repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for run_id in (first_run, second_run):
        run = client.get_run(run_id)
        assert run.data.tags["git.commit"] and run.data.tags["device"] == "cpu"
        assert run.data.tags["data.digest"] == run.inputs.dataset_inputs[0].dataset.digest
        assert {a.path for a in client.list_artifacts(run_id, "lineage")} == {
            "lineage/params.yaml", "lineage/dvc.lock", "lineage/fingerprint.json"}
        machine = {k.removeprefix("fingerprint."): v for k, v in run.data.tags.items() if k.startswith("fingerprint.")}
        assert set(fingerprint.NUMERIC_FIELDS) <= machine.keys() and machine["device"] == "cpu"
        assert machine["lock_installed"] == "matches" and machine["lock"].startswith("requirements.lock:")
    first_machine = json.loads(git(repo, "show", "HEAD:metrics/fingerprint.json"))
    assert first_machine["aten_kernels"] == "avx2" and first_machine["threads"] == "2"  # the offline profile pins
    assert first_machine == {k.removeprefix("fingerprint."): v for k, v in client.get_run(first_run).data.tags.items()
                             if k.startswith("fingerprint.")}
    older = client.get_run(second_run).data.tags
    assert older["fingerprint.aten_kernels"] == older_cpu()["ATEN_CPU_CAPABILITY"]
    assert older["fingerprint.onednn_isa"] == older_cpu()["ONEDNN_MAX_CPU_ISA"]
    first = client.get_run(first_run)
    assert first.data.tags["git.dirty"] == "false" and "dvc.exp_name" not in first.data.tags
    prepared = next(o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    second = client.get_run(second_run)
    assert second.data.tags["dvc.exp_name"] == "faster"
    assert second.data.tags["data.digest"] == prepared["md5"]
    model = next(o for o in lock["stages"]["train"]["outs"] if o["path"] == "models/best")
    assert second.data.tags["model.digest"] == model["md5"]


def test_reproduce_a_committed_run_by_its_mlflow_run_id(history):
    repo, first_run, _, _ = history
    before = workspace_state(repo)
    proc = reproduce(repo, first_run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict: REPRODUCED (identical metrics, identical model weights)" in proc.stdout
    assert "rule: identical metrics and weights, because same kernels, threads and versions" in proc.stdout
    assert "test_after_cider_d" in proc.stdout and " NO" not in proc.stdout
    assert "aten_kernels      avx2" in proc.stdout and "lock_installed    matches" in proc.stdout
    assert "reproduce: stage 'train' started" in proc.stderr and "step 12/12 (100%)" in proc.stderr
    assert workspace_state(repo) == before
    assert "fashioncap-reproduce" not in git(repo, "worktree", "list")


def test_reproduce_an_experiment_by_its_name(history):
    repo, _, second_run, pinning_matters = history
    before = workspace_state(repo)
    proc = reproduce(repo, "faster")  # trained as an older CPU would; re-run on this one, pinned to match
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DVC experiment 'faster'" in proc.stdout and "verdict: REPRODUCED (identical metrics" in proc.stdout
    assert "model digest: identical" in proc.stdout
    pins = older_cpu()
    assert (f"pinned to the original's: ATEN_CPU_CAPABILITY={pins['ATEN_CPU_CAPABILITY']}, "
            f"ONEDNN_MAX_CPU_ISA={pins['ONEDNN_MAX_CPU_ISA']}") in proc.stdout
    assert pinning_matters, "this CPU's own kernels train the same weights: the test proves nothing here"
    assert workspace_state(repo) == before


def test_unreproducible_references_say_why(history):
    import mlflow

    repo, first_run, _, _ = history
    client = client_of(repo)
    with pytest.raises(ReproduceError, match="neither an MLflow run id"):
        resolve("no-such-thing", repo, client)
    experiment = client.get_run(first_run).info.experiment_id
    dirty = client.create_run(experiment, tags={"git.commit": git(repo, "rev-parse", "HEAD"), "git.dirty": "true",
                                                "git.dirty_paths": "src/fashioncap/train.py"})
    with pytest.raises(ReproduceError, match=r"uncommitted changes \(src/fashioncap/train.py\)"):
        resolve(dirty.info.run_id, repo, client)
    lost = client.create_run(experiment, tags={"git.commit": "f" * 40, "git.dirty": "false"})
    with pytest.raises(ReproduceError, match="not in this repository"):
        resolve(lost.info.run_id, repo, client)
    with pytest.raises(ReproduceError, match=r"HEAD~1 \(\w+\) has no dvc.lock: nothing was run at that commit.*"
                                             r"run it first \(`dvc exp run`\)"):
        resolve("HEAD~1", repo, client)  # the commit of the tiny params, before `dvc repro`
    later = commit_without_lock(repo)
    with pytest.raises(ReproduceError, match="nearest earlier commit with a result: " + git(repo, "rev-parse", "HEAD")[:10]):
        resolve(later, repo, client)
    with pytest.raises(ReproduceError, match="not in the model registry"):
        resolve("models:/fashion-captioner/99", repo, client)
    assert mlflow.active_run() is None


def commit_without_lock(repo: Path) -> str:
    """A commit on top of HEAD without dvc.lock (code changed, nothing run yet); work tree and HEAD untouched."""
    env = {**os.environ, "GIT_INDEX_FILE": str(repo / ".git" / "index-test"), "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run = lambda *args: subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True,  # noqa: E731
                                       check=True).stdout.strip()
    run("read-tree", "HEAD")
    run("rm", "-q", "--cached", "dvc.lock")
    commit = run("commit-tree", run("write-tree"), "-p", "HEAD", "-m", "code changed, not run yet")
    (repo / ".git" / "index-test").unlink()
    return commit


def test_a_registered_version_resolves_to_the_run_that_made_it(history):
    repo, first_run, second_run, _ = history
    client = client_of(repo)
    candidate = resolve("models:/fashion-captioner@candidate", repo, client)
    assert "DVC experiment 'faster'" in candidate.what and f"run {second_run}" in candidate.what
    assert candidate.original == {k: v for k, v in client.get_run(second_run).data.metrics.items()
                                  if k.startswith("test_")}
    first = resolve("models:/fashion-captioner/1", repo, client)
    assert first.revision == client.get_run(first_run).data.tags["git.commit"]
    assert first.machine["aten_kernels"] == "avx2"


def test_compare_is_exact_on_cpu_and_relative_on_gpu():
    rows, same = compare({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0 + 1e-12}, tolerance=0.0)
    assert not same and rows[1][3] is False
    _, same = compare({"a": 1.0}, {"a": 1.01}, tolerance=0.02)
    assert same


def test_verdict_says_whether_metrics_and_weights_matched():
    rows, same = compare({"a": 1.0}, {"a": 1.0}, tolerance=0.0)
    cpu = Target("r", "run x", {"a": 1.0}, {}, "d1")
    exact = Rule(0.0, "the same machine")
    text = report(cpu, rows, same, weights_verdict("d1", "d2", 0.0), exact)
    assert "model digest: DIFFERS" in text and "NOT REPRODUCED (identical metrics, but the model weights differ)" in text
    assert weights_verdict("d1", "d2", 0.02)[1] and "as expected when the machines differ" in weights_verdict("d1", "d2", 0.02)[0]
    assert weights_verdict(None, "d2", 0.0) == ("model digest: not recorded for the original, not compared", True)
    rows, same = compare({"a": 1.0}, {"a": 2.0}, tolerance=0.0)
    assert "1 of 1 metrics differ; model weights identical" in report(cpu, rows, same, weights_verdict("d1", "d1", 0.0), exact)


def test_progress_reports_stages_and_training_steps_with_an_eta():
    watch = Progress()
    assert watch.update("Running stage 'train':", 0.0) == "stage 'train' started"
    assert watch.update("12:00:01 INFO fashioncap.train: step 10/100 loss 2.1 lr 1e-5", 0.0) == \
        "stage 'train': step 10/100 (10%)"
    assert watch.update("12:00:02 INFO fashioncap.train: step 20/100 loss 2.0 lr 1e-5", 5.0) is None  # too soon
    assert watch.update("INFO fashioncap.train: step 30/100 loss 1.9 lr 1e-5", 20.0) == \
        "stage 'train': step 30/100 (30%), ETA 0:01:10"
    assert watch.update("some other line", 30.0) is None


def test_data_and_models_pushed_by_one_clone_are_pulled_by_another(history, tmp_path):
    repo, _, _, _ = history
    sh([str(BIN / "dvc"), "push", "--all-commits"], repo)  # HEAD's outputs, not only the workspace's
    other = tmp_path / "other"
    sh(["git", "clone", "-q", str(repo), str(other)], tmp_path)
    remote = sh([str(BIN / "dvc"), "remote", "list", "--local"], repo).stdout.split()[1]
    sh([str(BIN / "dvc"), "remote", "modify", "--local", "local", "url", remote], other)
    sh([str(BIN / "dvc"), "pull"], other)
    status = sh([str(BIN / "dvc"), "status", "--json"], other).stdout
    assert pending(json.loads(status)) == {}
    for path in ("data/prepared", "models/best"):
        assert sorted(p.name for p in (other / path).rglob("*")) == sorted(p.name for p in (repo / path).rglob("*"))
