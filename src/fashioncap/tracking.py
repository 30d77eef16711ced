"""MLflow tracking: where the store is, one run per pipeline execution, and what it is tagged with."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from . import fingerprint, lineage
from .config import BASE_TEST, Params, flatten
from .runtime import project_root

log = logging.getLogger(__name__)
FINGERPRINT_TAG = "fingerprint."
PROCESS_TAG = "fashioncap.process"  # host:pid:start of the process that has the run open


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the embedded store `mlflow.db` at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def _mlflow():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def experiment_id(name: str) -> str:
    """Gets or creates the experiment; in the embedded store its artifacts live in `mlruns/` at the root,
    also for runs that DVC executes in a temporary copy of the repository. Parallel workers of a sweep may
    create it at the same moment: the one that loses the race uses the winner's."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    mlflow = _mlflow()
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (project_root() / "mlruns").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as error:
        found = mlflow.get_experiment_by_name(name)
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS) or found is None:
            raise
        log.info("experiment %s was created by a parallel run at the same moment; using it", name)
        return found.experiment_id


def run_tags(params: Params) -> dict[str, str]:
    """Tags that say what produced a run: profile, model, DVC experiment and baseline."""
    tags = {"profile": params.profile, "model.init": params.model.init, "data.source": params.data.source}
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def run_name(params: Params) -> str:
    """A readable name for the MLflow UI: the DVC experiment (or 'repro'), the profile and the model."""
    exp = os.environ.get("DVC_EXP_NAME") or "repro"
    model = "scratch" if params.model.from_scratch else Path(params.model.init).name
    return f"{exp}-{params.profile}-{model}-lr{params.train.lr:g}"


def this_process() -> str:
    """The process writing to a run, as host:pid:start-time (a pid alone may be reused)."""
    import socket

    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.2f}"


def _alive(process: str) -> bool | None:
    """Whether the process named by this_process() still runs; None when it ran on another host."""
    import socket

    import psutil

    try:
        host, pid, created = process.rsplit(":", 2)
        if host != socket.gethostname():
            return None
        return abs(psutil.Process(int(pid)).create_time() - float(created)) < 0.05
    except psutil.NoSuchProcess:
        return False
    except (ValueError, psutil.Error):
        return None


def reap_killed_runs(experiment: str) -> list[str]:
    """Ends as KILLED the runs of this experiment that a process of this host left RUNNING and no longer
    runs (a SIGKILL, a lost machine's power: nothing ended them); returns their ids. Runs of live
    processes, and of other hosts, are left as they are."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    reaped = []
    for run in client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        process = run.data.tags.get(PROCESS_TAG)
        if process and _alive(process) is False:
            client.set_terminated(run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
            log.warning("run %s was left RUNNING by %s, which is gone (killed): marked KILLED", run.info.run_id,
                        process)
    return reaped


def start_run(params: Params, extra_tags: dict[str, str] | None = None):
    """Starts the pipeline's run, tagged with its lineage, and logs every parameter (flattened)."""
    mlflow = _mlflow()
    reap_killed_runs(params.tracking.experiment)
    tags = {**run_tags(params), **lineage.git_state(Path.cwd()), **(extra_tags or {}), PROCESS_TAG: this_process()}
    # system metrics (CPU, memory, disk, network; GPU through nvidia-ml-py) sampled while training runs
    run = mlflow.start_run(experiment_id=experiment_id(params.tracking.experiment), run_name=run_name(params),
                           tags=tags, log_system_metrics=True)
    mlflow.log_params({k: "null" if v is None else v for k, v in flatten(params).items()})
    return run


STAGE_PARAM = "fashioncap.stage."  # + stage: the digest of the params that stage logged into the run with
_NOT_INHERITED = ("mlflow.runName", "mlflow.parentRunId", "mlflow.log-model.history", PROCESS_TAG)


def declared_params(stage: str) -> list[str]:
    """The params dvc.yaml declares for a stage: what decides whether DVC runs it again. The stage's own
    dvc.yaml (DVC runs stages at the root of the copy it executes), else the one beside this package."""
    import yaml

    found = [p for p in (Path.cwd() / "dvc.yaml", Path(__file__).resolve().parents[2] / "dvc.yaml") if p.is_file()]
    if not found:
        raise FileNotFoundError("no dvc.yaml in the working directory or beside the package: the pipeline's stages "
                                "run from the repository's root")
    stages = yaml.safe_load(found[0].read_text())["stages"]
    return [p for p in stages[stage].get("params", []) if isinstance(p, str)]


def stage_run(params: Params, run_id: str, stage: str, inherit_metric=lambda key: True) -> str:
    """The run a later stage (evaluate, report, register) logs into: one run per pipeline execution.

    The stage logs into `run_id` (the training run, or the evaluation run before it) when that run's params
    agree with the stage's declared ones and no execution with other such params has logged into it. An
    experiment that changes only later stages' params finds the train stage skipped or restored, so its
    stages would write over the earlier execution's metrics and artifacts there; instead it gets a run of its
    own, nested under that run in the UI and tagged with it (`mlflow.parentRunId`), holding the earlier run's
    params and metrics (those `inherit_metric` keeps) beside its own. The claim is a param (MLflow never
    changes a param's value), so parallel workers cannot both take the same run. Re-runs of the same
    execution find their run again."""
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    declared = set(declared_params(stage))
    own = {k: "null" if v is None else str(v) for k, v in flatten(params).items() if k in declared}
    digest = hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()[:16]
    claim = STAGE_PARAM + stage
    parent = client.get_run(run_id)
    if all(parent.data.params.get(k, v) == v for k, v in own.items()):
        try:
            client.log_param(run_id, claim, digest)
        except MlflowException:
            pass  # another execution claimed it first (or this one did, with the same digest)
        if client.get_run(run_id).data.params.get(claim) == digest:
            client.log_batch(run_id, params=[Param(k, v) for k, v in own.items() if k not in parent.data.params])
            return run_id
    experiment = parent.info.experiment_id
    for child in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000):
        if child.data.params.get(claim) == digest:
            log.info("%s logs into run %s, this execution's own (nested under %s)", stage, child.info.run_id, run_id)
            return child.info.run_id
    tags = {k: v for k, v in parent.data.tags.items() if k not in _NOT_INHERITED}
    tags.update({**run_tags(params), **lineage.git_state(Path.cwd()), "mlflow.parentRunId": run_id,
                 PROCESS_TAG: this_process()})
    name = f"{parent.data.tags.get('mlflow.runName', run_id[:8])}+{stage}-{digest[:6]}"
    child = client.create_run(experiment, run_name=name, tags=tags).info.run_id
    inherited = [Param(k, v) for k, v in parent.data.params.items() if k not in own and not k.startswith(STAGE_PARAM)]
    mine = [*inherited, *(Param(k, v) for k, v in own.items()), Param(claim, digest)]
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in parent.data.metrics.items() if inherit_metric(k)]
    for start in range(0, max(len(mine), len(metrics)), 100):  # MLflow's limit per batch
        client.log_batch(child, params=mine[start:start + 100], metrics=metrics[start:start + 100])
    log.warning("%s's params differ from those run %s was logged with (an experiment that changed only later "
                "stages): this execution logs into its own run %s (%s), nested under it", stage, run_id, child, name)
    return child


def log_fingerprint(machine: dict[str, str]) -> None:
    """The machine the run computes on, as `fingerprint.<field>` tags and `lineage/fingerprint.json`."""
    mlflow = _mlflow()
    mlflow.set_tags({FINGERPRINT_TAG + k: v for k, v in machine.items()})
    mlflow.log_dict(machine, "lineage/fingerprint.json")


def run_fingerprint(tags: dict[str, str]) -> dict[str, str]:
    """The fingerprint a run was tagged with ({} for runs made before fingerprints were recorded)."""
    return {k.removeprefix(FINGERPRINT_TAG): v for k, v in tags.items() if k.startswith(FINGERPRINT_TAG)}


def check_machine(run_id: str, machine: dict[str, str], tag: str, what: str) -> dict:
    """Compares this machine with the one the run started on. Where they compute differently (a resume or
    the evaluate stage elsewhere), the run gets the tag `fingerprint.<tag>` naming the fields and a warning
    says so: its result then matches neither machine bit for bit. Returns the run's own fingerprint."""
    original = run_fingerprint(_mlflow().get_run(run_id).data.tags)
    if not original:
        return machine
    changed = [f"{k}: {original.get(k)} -> {machine.get(k)}"
               for k in fingerprint.numeric_differences(original, machine)]
    if changed:
        note = "; ".join(changed)[:1000]
        log.warning("%s on a machine that computes differently (%s): the result will not be bit-identical to a "
                    "run made on either machine alone", what, note)
        _mlflow().set_tag(FINGERPRINT_TAG + tag, note)
        original = {**original, tag: note}
    return original


def log_dataset(data_dir: Path, context: str) -> str:
    """Logs the prepared data as the run's dataset input, with the digest DVC recorded for it."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    digest = lineage.lock_digests(Path("dvc.lock")).get(data_dir.as_posix()) or lineage.dataset_digest(data_dir)
    dataset = MetaDataset(resolve_dataset_source(data_dir.resolve().as_uri()), name=data_dir.name, digest=digest)
    try:
        _mlflow().log_input(dataset, context=context)
    except Exception as error:
        # the workers of a sweep train on the same prepared data: two that log it at the same moment both find
        # no row for it in the experiment and both insert one, and the store refuses the second (MLflow's
        # server answers 400 with the database's unique-key error). The row is there now: logging again links it.
        if not duplicate_key(error):
            raise
        log.info("dataset %s was logged by a parallel run at the same moment; linking it", data_dir.name)
        _mlflow().log_input(dataset, context=context)
    return digest


def duplicate_key(error: BaseException) -> bool:
    """Whether the store refused a row because another writer inserted the same key first (PostgreSQL, MySQL
    or SQLite, directly or through a tracking server)."""
    marks = ("UniqueViolation", "duplicate key value", "UNIQUE constraint failed", "Duplicate entry")
    return any(m in str(error) for m in marks)


def resume_run(run_id: str, system_metrics: bool = False):
    """Reopens the pipeline's run (started by the train stage), as this process's: a kill leaves it RUNNING
    with this process named, for the next stage or run to mark KILLED."""
    mlflow = _mlflow()
    run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
    mlflow.set_tag(PROCESS_TAG, this_process())
    return run


def write_run_ref(path: Path, run_id: str, experiment: str) -> None:
    """Records the run id for the later stages."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, "experiment": experiment}, indent=2) + "\n")


def read_run_ref(path: Path) -> str:
    """The run id recorded by the train stage."""
    return json.loads(path.read_text())["run_id"]


def mlflow_metrics(table: dict) -> dict[str, float]:
    """Flat metric names for MLflow: test_<when>_<metric>, e.g. test_after_cider_d."""
    out = {}
    for when in ("before", "after", "before_novel", "after_novel"):
        for name, value in table.get(when, {}).items():
            out[f"test_{when}_{name}"] = value
    out["test_exact_match_after"] = table["exact_match_after"]
    for when, suffix in (("after", ""), ("before", "_before")):  # attr/<type>/<precision|recall|f1>
        for kind, s in table.get("attributes", {}).get(when, {}).items():
            out.update({f"attr/{kind}/{m}{suffix}": s[m] for m in ("precision", "recall", "f1") if s[m] is not None})
    for category, scores in table.get("per_category", {}).items():
        for when in ("before", "after"):
            for name in ("cider_d", "bleu_4"):
                out[f"category/{category}/test_{when}_{name}"] = scores[when][name]
    base = table.get(BASE_TEST, {})  # the base catalogue's test split, after adapting: base_test_<when>_<metric>
    for when in ("before", "after", "forgot"):
        out.update({f"base_test_{when}_{name}": value for name, value in base.get(when, {}).items()})
    for when, suffix in (("after", ""), ("before", "_before")):  # base_test/attr/<type>/f1
        out.update({f"base_test/attr/{kind}/f1{suffix}": s["f1"] for kind, s in
                    base.get("attributes", {}).get(when, {}).items() if s["f1"] is not None})
    return out
