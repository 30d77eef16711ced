"""End to end: the real `dvc` CLI runs the offline profile in a temporary git copy of the repository."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, FAKE_SECRETS, TINY_OVERRIDES, copy_repo, set_args, sh
from tests.sweeps import accounted_for, sweep

pytestmark = pytest.mark.slow


def mlflow_client(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


SWEEP_RATES = ("0.002", "0.003")  # neither is the committed run's 0.001: both train
SWEPT = [f"tiny-queued-{rate}" for rate in SWEEP_RATES]
QUEUED = SWEPT[0]  # the queued experiment the comparisons below name


@pytest.fixture(scope="module")
def first_run(tiny_repo, tmp_path_factory):
    """A copy of the committed tiny project (`dvc repro` of the offline profile, results committed), then
    experiments that leave its workspace as it was: a sweep of two queued ones with other learning rates,
    run by two `dvc queue` workers at once on the embedded sqlite store, and one that runs the pipeline up to
    `train` under `accelerate launch` with two processes (--temp). All run before any test, so the tests
    only read and pass in any order."""
    repo = copy_repo(tiny_repo, tmp_path_factory.mktemp("pipeline") / "repo")
    assert sweep(repo, "tiny-queued", SWEEP_RATES) == SWEPT
    launcher = "train.launcher=accelerate launch --config_file conf/accelerate/ddp_cpu.yaml"
    sh([str(BIN / "dvc"), "exp", "run", "--temp", "-n", "tiny-ddp", *set_args([*TINY_OVERRIDES, launcher]), "train"],
       repo)
    return repo


def runs_by_experiment(repo: Path) -> dict[str | None, list]:
    """MLflow runs by DVC experiment name; the committed `dvc repro` run is under None."""
    client = mlflow_client(repo)
    by_name: dict[str, list] = {}
    for run in client.search_runs([client.get_experiment_by_name("fashioncap").experiment_id]):
        by_name.setdefault(run.data.tags.get("dvc.exp_name"), []).append(run)
    return by_name


def test_credentials_in_the_environment_never_reach_mlflow(first_run):
    stored = [first_run / "mlflow.db", *(p for p in (first_run / "mlruns").rglob("*") if p.is_file())]
    assert len(stored) > 10
    for path in stored:
        content = path.read_bytes()
        for name, secret in FAKE_SECRETS.items():
            assert secret.encode() not in content, f"{name} leaked into {path}"


def test_tiny_offline_pipeline_writes_metrics_lock_and_predictions(first_run):
    repo = first_run
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["profile"] == "offline" and params["train"]["max_steps"] == 12
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"init", "prepare", "train", "evaluate", "report", "register"}
    train_params = lock["stages"]["train"]["params"]["params.yaml"]
    assert train_params["train.max_steps"] == 12 and "report.gallery_items" not in train_params  # leaf keys it reads
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    for when in ("before", "after", "before_novel", "after_novel"):
        assert set(evaluation[when]) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d", "rouge_l", "meteor"}
    assert 0 <= evaluation["after"]["meteor"] <= 1
    assert "<th>METEOR before</th>" in (repo / "reports/report.html").read_text()
    attributes = evaluation["attributes"]
    assert set(attributes["after"]) == {"colour", "pattern", "material", "garment", "detail"}
    assert attributes["after"]["colour"]["expected"] > evaluation["test_items"]  # every product has colours
    assert "<h2>Attributes</h2>" in (repo / "reports/report.html").read_text()
    prepared = json.loads((repo / "metrics/prepare.json").read_text())
    assert evaluation["test_items"] == prepared["test_items"]
    predictions = [json.loads(line) for line in (repo / "reports/predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == prepared["test_items"]
    assert {"key", "reference", "before", "after", "novel"} <= set(predictions[0])
    assert (repo / "models/best/model.safetensors").is_file()
    assert {"cider_d_before", "cider_d_after", "category"} <= set(predictions[0])
    assert set(evaluation["per_category"]) == {p["category"] for p in predictions}
    assert (repo / "reports/report.html").stat().st_size > 10_000
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["steps"] == 12 and 1 <= train["best_step"] <= 12
    registered = json.loads((repo / "models/registered.json").read_text())
    assert registered == {"name": "fashion-captioner", "version": "1", "run_id": registered["run_id"]}


def test_registered_version_carries_its_scores_and_promotes(first_run):
    client = mlflow_client(first_run)
    run_ref = json.loads((first_run / "models/run.json").read_text())
    [candidate] = client.search_model_versions(f"name = 'fashion-captioner' and run_id = '{run_ref['run_id']}'")
    assert str(candidate.version) == "1"  # the committed run came first
    evaluation = json.loads((first_run / "metrics/eval.json").read_text())
    assert float(candidate.tags["test_cider_d"]) == pytest.approx(evaluation["after"]["cider_d"])
    assert candidate.tags["data_digest"] == evaluation["test_digest"]
    assert float(candidate.tags["test_meteor"]) == pytest.approx(evaluation["after"]["meteor"])
    garment = evaluation["attributes"]["after"]["garment"]["f1"]
    assert float(candidate.tags["test_attr_garment_f1"]) == pytest.approx(garment)
    promoted = sh([str(BIN / "fashioncap"), "promote", "1"], first_run)
    assert "fashion-captioner@champion: nothing -> version 1" in promoted.stdout
    again = sh([str(BIN / "dvc"), "repro", "--force", "--single-item", "register"], first_run)  # re-run: no new version
    versions = client.search_model_versions(f"name = 'fashion-captioner' and run_id = '{run_ref['run_id']}'")
    assert len(versions) == 1, again.stdout


def test_one_mlflow_run_with_params_loss_history_and_eval_metrics(first_run):
    client = mlflow_client(first_run)
    exp = client.get_experiment_by_name("fashioncap")
    assert exp.artifact_location.removeprefix("file://").startswith(str(first_run / "mlruns"))
    by_name = runs_by_experiment(first_run)
    assert {name: len(runs) for name, runs in by_name.items()} == {None: 1, **{n: 1 for n in SWEPT}, "tiny-ddp": 1}
    [run] = by_name[None]  # one MLflow run per pipeline execution
    run_ref = json.loads((first_run / "models/run.json").read_text())
    assert run.info.run_id == run_ref["run_id"]
    assert run.data.params["train.max_steps"] == "12" and run.data.params["profile"] == "offline"
    assert run.data.tags["mlflow.source.git.commit"]
    assert run.info.run_name == "repro-offline-scratch-lr0.001"
    assert by_name[QUEUED][0].info.run_name == f"{QUEUED}-offline-scratch-lr0.002"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 13))
    assert len(client.get_metric_history(run.info.run_id, "val_cider_d")) == 2
    evaluation = json.loads((first_run / "metrics/eval.json").read_text())
    assert run.data.metrics["test_after_cider_d"] == pytest.approx(evaluation["after"]["cider_d"])
    assert run.data.metrics["test_after_meteor"] == pytest.approx(evaluation["after"]["meteor"])
    colour = evaluation["attributes"]["after"]["colour"]
    assert run.data.metrics["attr/colour/recall"] == pytest.approx(colour["recall"])
    assert run.data.metrics["attr/colour/precision_before"] == pytest.approx(
        evaluation["attributes"]["before"]["colour"]["precision"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "eval.json", "predictions.jsonl", "train.json", "report.html",
            "predictions_table.json"} <= artifacts
    assert list((first_run / "mlruns").rglob("loss_curve.png"))
    assert run.data.metrics["category/watch/test_after_cider_d"] >= 0


def test_mlflow_ui_views_get_the_captions_table_step_images_and_system_metrics(first_run):
    client = mlflow_client(first_run)
    [run] = runs_by_experiment(first_run)[None]
    run_id = run.info.run_id
    table = json.loads(Path(client.download_artifacts(run_id, "predictions_table.json")).read_text())
    columns = table["columns"]
    assert {"image", "key", "reference", "before", "after", "cider_d_after"} <= set(columns)
    evaluation = json.loads((first_run / "metrics/eval.json").read_text())
    assert evaluation["test_items"] > 10 and len(table["data"]) == 10  # evaluate.table_images bounds it
    cell = table["data"][0][columns.index("image")]
    assert cell["type"] == "image" and cell["filepath"].startswith("table_images/")
    steps = {int(re.search(r"\+step\+(\d+)\+", a.path).group(1))
             for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")}
    assert steps == {6, 12}  # captioned validation images at every evaluation
    assert client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert client.get_metric_history(run_id, "system/system_memory_usage_megabytes")


def test_report_renders_offline_in_headless_chromium_with_every_image(first_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium package is missing: .ci/run installs it")
        pytest.skip("needs Debian's chromium package (apt-get install chromium)")
    page = (first_run / "reports/report.html").read_text()
    # a probe added to a copy, not to the report: after load, count the images the browser decoded
    probe = ("<script>addEventListener('load',()=>{const i=[...document.images];document.body.dataset.loaded="
             "i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length})</script></body>")
    copy = tmp_path / "report.html"
    copy.write_text(page.replace("</body>", probe))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000"]  # no network at all
    dom = subprocess.run([*flags, "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[-2000:]
    total = page.count("<img ")
    assert int(loaded.group(1)) == int(loaded.group(2)) == total >= 2
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1280,1600", f"--screenshot={shot}", (first_run / "reports/report.html")
                    .as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").resize((160, 200)).getcolors(maxcolors=200 * 160)
    assert len(colours) > 500  # rendered images and charts, not a blank page


def test_params_show_in_dvc_exp_show_and_params_diff(first_run):
    shown = json.loads(sh([str(BIN / "dvc"), "exp", "show", "--json"], first_run).stdout)
    text = json.dumps(shown)
    assert QUEUED in text and '"profile": "offline"' in text
    # the tiny params against the project's own, commit to commit (HEAD~2 is the clone as it came)
    diff = sh([str(BIN / "dvc"), "params", "diff", "HEAD~2", "HEAD", "--json"], first_run).stdout
    changed = json.loads(diff)["params.yaml"]
    assert changed["profile"] == {"old": "default", "new": "offline"}
    assert changed["train.max_steps"]["new"] == 12


def test_queued_and_temporary_experiments_land_in_the_same_store(first_run):
    repo = first_run
    client = mlflow_client(repo)
    exp = client.get_experiment_by_name("fashioncap")
    names = {r.data.tags.get("dvc.exp_name") for r in client.search_runs([exp.experiment_id])}
    assert {None, *SWEPT, "tiny-ddp"} <= names
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    assert len(list((repo / "mlruns").rglob("loss_curve.png"))) == 4
    assert {str(v.version) for v in client.search_model_versions("name = 'fashion-captioner'")} == {"1", "2", "3"}


def test_a_parallel_sweep_on_the_embedded_sqlite_store(first_run):
    """Two `dvc queue` workers on one sqlite file, registering into one registry: each experiment in
    `dvc exp show` with its metrics, one finished run with its whole history, one version (tests/sweeps.py)."""
    accounted_for(first_run, mlflow_client(first_run), SWEPT, 1)  # version 1 is the committed run's


def test_dvc_compares_experiments_curves_metrics_and_changed_params(first_run):
    repo = first_run
    shown = sh([str(BIN / "dvc"), "exp", "show", "--only-changed", "--csv"], repo).stdout
    rows = {r["Experiment"]: r for r in csv.DictReader(io.StringIO(shown)) if r["Experiment"]}
    assert {"tiny-ddp", QUEUED} <= set(rows)
    assert rows["tiny-ddp"]["train.lr"] != rows[QUEUED]["train.lr"]
    header = shown.splitlines()[0].split(",")
    assert any(h.endswith("after.cider_d") for h in header) and "train.lr" in header
    assert "seed" not in header and "tracking.experiment" not in header  # unchanged params are left out
    plots = json.loads(sh([str(BIN / "dvc"), "plots", "diff", "tiny-ddp", QUEUED, "--json"], repo).stdout)
    plots = plots["data"]
    for title in ("Training loss", "Validation loss", "Validation CIDEr-D"):
        revisions = {point["rev"] for point in plots[title][0]["content"]["data"]["values"]}
        assert revisions == {"tiny-ddp", QUEUED}, title


def test_train_stage_runs_under_accelerate_launch_with_two_processes(first_run):
    repo = first_run
    client = mlflow_client(repo)
    by_name = runs_by_experiment(repo)
    assert len(by_name["tiny-ddp"]) == 1  # only the main process logs
    ddp, single = by_name["tiny-ddp"][0], by_name[None][0]
    train = json.loads(Path(client.download_artifacts(ddp.info.run_id, "train.json")).read_text())
    assert train["processes"] == 2 and train["steps"] == 12
    assert sorted(m.step for m in client.get_metric_history(ddp.info.run_id, "train_loss")) == list(range(1, 13))
    # the same global batch split over two processes: the same recipe, so nearly the same losses
    for metric in ("train_loss", "val_loss"):
        a, b = ddp.data.metrics[metric], single.data.metrics[metric]
        assert abs(a - b) / b < 0.05, (metric, a, b)
