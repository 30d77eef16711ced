"""Shared fixtures: the repository's real params, shrunk so a model trains in seconds on a CPU."""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import services
from tests.services import answers, process

free_port = services.free_port  # the test modules import it from here

# Under pytest-xdist the workers share the cores: torch's OpenMP threads must not spin-wait for a core another
# worker holds (with the default active wait, two trainings at once ran ten times slower). The policy
# changes when an idle thread sleeps, never what it computes; set before any torch is loaded, and inherited
# by every process a test starts.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The tests' Spark JVMs (a catalogue job's driver; a standalone cluster's master, workers and executors) live
# for seconds, where HotSpot's optimising compiler (C2) and parallel collector cost more CPU than they save: a
# local job's driver took 18.0 core-seconds with the defaults and 8.9 with C1 alone and the serial collector
# (2-core Intel Xeon), for the same output. The job's users keep the defaults, and so does METEOR's JVM (it
# computes: C1 alone made it slower).
SHORT_LIVED_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
os.environ.setdefault("SPARK_SUBMIT_OPTS", SHORT_LIVED_JVM)
os.environ.setdefault("SPARK_DAEMON_JAVA_OPTS", SHORT_LIVED_JVM)


def pytest_configure(config):
    """The session's collector tuned as a stage's is (fashioncap.runtime.tune_collector): a worker holds torch,
    transformers and MLflow for its whole life, and every full pass would walk their objects again."""
    from fashioncap.runtime import COLLECTOR_THRESHOLDS

    gc.set_threshold(*COLLECTOR_THRESHOLDS)


def pytest_collection_finish(session):
    gc.freeze()  # the test modules and what they import live as long as the session


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per core and one more, at most five. The suite spends part of its time waiting (on
    servers starting, outages it stages, retries): on two cores, three workers ran `.ci/run` in 1056 s and two
    in 1206 s (the same commit, 2-core AMD EPYC)."""
    return max(1, min((os.cpu_count() or 1) + 1, 5))

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A tiny offline configuration: the same code paths as the real job, seconds instead of minutes.
TINY_OVERRIDES = [
    "profile=offline",
    "data.synthetic.items=150",
    "data.synthetic.render_size=64",
    "data.val_fraction=0.1",
    "data.test_fraction=0.15",
    "model.image_size=32",
    "model.scratch.patch_size=8",
    "model.scratch.vision_layers=1",
    "model.scratch.text_layers=1",
    "model.scratch.vision_hidden=32",
    "model.scratch.text_hidden=32",
    "model.scratch.vision_intermediate=64",
    "model.scratch.text_intermediate=64",
    "train.batch_size=8",
    "train.max_steps=12",
    "train.warmup_steps=2",
    "train.eval_every=6",
    "train.checkpoint_every=4",
    "train.eval_samples=8",
    "train.num_workers=0",
    "train.log_every=4",
    "model.max_caption_tokens=24",
    "generate.max_new_tokens=24",
    "generate.batch_size=16",
    "evaluate.table_images=10",
    "evaluate.meteor=false",  # its Java takes 5 s to start: on in the committed tiny project only (tiny_repo)
    "registry.max_images=4",
    "registry.max_pixels=10000",
    "registry.max_request_bytes=60000",
]


# The modules that take longest (wall clock, under three workers on two cores), longest first. pytest-xdist
# hands whole modules (`--dist loadfile`) to the workers in collection order (`--no-loadscope-reorder`; its
# default order, most tests first, left the one-test modules that run for minutes to the end, where a worker
# still busy with one can outlast the others); the rest follow in their usual order.
LONGEST_FIRST = (
    "tests/e2e/test_team.py",  # services, an outage, two clones, a sweep: mostly waiting
    "tests/e2e/test_hermetic.py",  # the whole pipeline module in a session of its own
    "tests/model/test_behaviour.py",
    "tests/e2e/test_benchmarks.py",
    "tests/e2e/test_reproduce.py",
    "tests/e2e/test_kill_anywhere.py",
    "tests/e2e/test_gpu_script.py",  # the GPU script's dry run: a rehearsal, a benchmark and a pipeline
    "tests/e2e/test_catalogue.py",
    "tests/e2e/test_adapt.py",  # two adaptations of the champion and a reproduction
    "tests/e2e/test_review_feedback.py",  # review, feedback and a prepare through the real CLIs
    "tests/e2e/test_rehearsal.py",
    "tests/stage/test_resume.py",
    "tests/e2e/test_wheel.py",
    "tests/e2e/test_distributed.py",
    "tests/stage/test_registry.py",
    "tests/stage/test_train.py",
    "tests/stage/test_coco_parity.py",
    "tests/e2e/test_serving.py",
)


@pytest.hookimpl(tryfirst=True)  # before --random-order and --reverse, which then reorder as they do
def pytest_collection_modifyitems(config, items):
    """tests/e2e/test_hermetic.py runs the whole pipeline module in a shell that names the user's world; when
    it is selected, that module runs there only, not a second time in this process (its tests then count in
    the hermetic test's own report). Selected alone, the pipeline module runs here as usual. The modules of
    LONGEST_FIRST come first, in its order (a stable sort: the order within a module stays)."""
    hermetic = [i for i in items if i.path == REPO / "tests/e2e/test_hermetic.py"]
    pipeline = [i for i in items if i.path == REPO / "tests/e2e/test_pipeline.py"]
    if hermetic and pipeline:
        config.hook.pytest_deselected(items=pipeline)
        items[:] = [i for i in items if i not in pipeline]
    rank = {REPO / path: n for n, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path, len(rank)))


def compose(overrides: list[str]) -> dict:
    """Composes conf/ exactly as `dvc exp run -S` does, returning the params mapping."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return OmegaConf.to_container(hydra_compose(config_name="config", overrides=overrides), resolve=True)


@pytest.fixture(scope="session")
def tiny_raw() -> dict:
    return compose(TINY_OVERRIDES)


@pytest.fixture
def tiny_params(tiny_raw):
    from fashioncap.config import parse_params

    return parse_params(copy.deepcopy(tiny_raw))


@pytest.fixture
def write_params(tmp_path):
    """Writes a params mapping to a file and returns its path."""

    def write(raw: dict, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


# Variables that name a store, remote, cache or credential of the user's (the team's MLflow server, a DVC or S3
# remote, the Hugging Face cache and token, git's global config): no test, nor any process a test starts, sees them.
USER_WORLD_PREFIXES = ("MLFLOW_", "AWS_", "DVC_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "DATABRICKS_", "AZURE_",
                       "GOOGLE_", "GIT_", "XDG_")
TEST_GIT_IDENTITY = "[user]\n\tname = fashioncap tests\n\temail = tests@fashioncap.invalid\n"


def hermetic_environ(environ: dict[str, str], home: Path) -> dict[str, str]:
    """The user's environment without the variables that name their world, HOME moved to `home` (so ~/.cache,
    ~/.config, ~/.aws, ~/.netrc, ~/.mlflow, DVC's global config and the Hugging Face cache are the session's
    own), and telemetry off."""
    from fashioncap.runtime import QUIET_ENV

    kept = {k: v for k, v in environ.items() if not k.startswith(USER_WORLD_PREFIXES)}
    return {**kept, "HOME": str(home), "HF_HOME": str(home / ".cache" / "huggingface"), **QUIET_ENV}


@pytest.fixture(scope="session", autouse=True)
def _hermetic_world(tmp_path_factory) -> Path:
    """The whole session, and every process it starts, runs in `hermetic_environ`. Session-scoped and
    autouse, so it is set up before every other fixture, the session-wide projects included."""
    home = tmp_path_factory.mktemp("home")
    (home / ".gitconfig").write_text(TEST_GIT_IDENTITY)
    target = {k: v for k, v in hermetic_environ(dict(os.environ), home).items() if k not in PINNED_ENV}
    with pytest.MonkeyPatch.context() as patch:
        for key in set(os.environ) - set(target):
            patch.delenv(key)
        for key, value in target.items():
            patch.setenv(key, value)
        yield home


PINNED_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS")


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch, tmp_path_factory):
    """No telemetry, and a Hugging Face datasets cache inside the test's temporary folder."""
    from fashioncap.runtime import QUIET_ENV

    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # mlflow.set_experiment exports it, for good
    monkeypatch.delenv("DVC_ROOT", raising=False)
    # a stage run in the test's process pins kernels and threads (numerics, straight into os.environ): never
    # for the next test's processes, nor for a module's or session's fixture set up before the next test.
    # Removed before and after each test, and not through monkeypatch: its undo would put back a value a
    # session fixture's in-process stage pinned before this test began.
    for key in PINNED_ENV:
        os.environ.pop(key, None)
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    yield
    for key in PINNED_ENV:
        os.environ.pop(key, None)
    if threads is not None:
        sys.modules["torch"].set_num_threads(threads)
    if "accelerate.state" in sys.modules:  # a stage run in this process fixed Accelerate's precision for it
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Holds an exclusive lock on `lock_path` (created if missing) for the block: the workers of one run wait
    for each other on it."""
    import fcntl

    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build(folder)` fills once per pytest run. Under pytest-xdist the workers share it: the
    first to ask builds it while the others wait, so a session's project is made once, not once per worker
    (each worker would take both cores' time to make the same bits)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / f"built-once-{name}"  # the run's folder, above each worker's
    with _exclusive(folder.with_suffix(".lock")):
        if not (folder / ".built").is_file():  # a worker that failed to build left no mark: build again
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_raw) -> tuple[Path, Path]:
    """A prepared tiny dataset and an untrained tiny BLIP saved as the train stage saves it (read-only: built
    once per run and shared by the workers)."""
    from fashioncap.config import parse_params

    root = built_once(tmp_path_factory, "tiny-model",
                      lambda folder: untrained_model(parse_params(copy.deepcopy(tiny_raw)), folder))
    return root / "best", root / "prepared"


def untrained_model(params, root: Path) -> tuple[Path, Path]:
    """Prepares the params' data into root/prepared and saves an untrained model as train saves its best."""
    from fashioncap.modeling import build_processor, initial_model
    from fashioncap.modeling import save_model
    from fashioncap.prepare import build_splits, save, token_lengths

    rows, rejected = build_splits(params)
    save(rows, rejected, root / "prepared", token_lengths(params.model, rows))
    processor = build_processor(params.model, [r["caption"] for r in rows["train"]])
    model = initial_model(params.model, processor, params.seed)
    save_model(model, processor, root / "best", params.generate)
    return root / "best", root / "prepared"


@pytest.fixture
def registry_env(tmp_path, monkeypatch, tiny_model):
    """A fresh MLflow store (sqlite + artifacts) in the test's folder, and the tiny model to register."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    model_dir, data_dir = tiny_model
    return MlflowClient(uri), model_dir, data_dir


@pytest.fixture
def cli_env(registry_env, tmp_path) -> dict:
    """The environment a user's shell would have, pointing at the test's store."""
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def train_command(workdir: Path, params: Path, data_dir: Path) -> list[str]:
    """The train stage's command line, every output inside `workdir` (as dvc.yaml passes them)."""
    return [sys.executable, "-m", "fashioncap.train", "--params", str(params), "--data", str(data_dir),
            "--model-dir", str(workdir / "best"), "--run-ref", str(workdir / "run.json"),
            "--metrics", str(workdir / "train.json"), "--train-log", str(workdir / "train_log.csv"),
            "--val-log", str(workdir / "val_log.csv"), "--checkpoint-dir", str(workdir / "ckpt"),
            "--loss-curve", str(workdir / "loss_curve.png"), "--fingerprint", str(workdir / "fingerprint.json")]


def train_outputs(workdir: Path):
    """The train stage's outputs inside `workdir`, for calling `train.train` in the test's process."""
    from fashioncap.train import Outputs

    return Outputs(workdir / "best", workdir / "run.json", workdir / "train.json", workdir / "train_log.csv",
                   workdir / "val_log.csv", workdir / "ckpt", workdir / "loss_curve.png", workdir / "fingerprint.json")


def table(cider: float, digest: str = "d1", garment_f1: float = 0.9, colour_f1: float = 0.8) -> dict:
    """An eval.json-shaped score table for registering a version (the attribute F1 the default gates read)."""
    scores = {"bleu_1": 0.5, "bleu_2": 0.4, "bleu_3": 0.3, "bleu_4": 0.2, "cider_d": cider, "rouge_l": 0.5}
    attributes = lambda garment, colour: {kind: {"precision": f1, "recall": f1, "f1": f1}  # noqa: E731
                                          for kind, f1 in (("garment", garment), ("colour", colour), ("detail", None))}
    return {"test_items": 20, "novel_items": 18, "before": {**scores, "cider_d": 0.01}, "after": scores,
            "attributes": {"before": attributes(0.1, 0.1), "after": attributes(garment_f1, colour_f1)},
            "test_digest": digest, "exact_match_after": 0.0}


def png_b64(colour=(200, 30, 30), size=(40, 40)) -> str:
    """A PNG of one colour, base64-encoded as a request carries it."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def new_run(params) -> str:
    """A finished MLflow run of the params, to register a version from."""
    import mlflow

    from fashioncap import tracking

    run = tracking.start_run(params)
    mlflow.end_run()
    return run.info.run_id


def shell_env(**env: str) -> dict[str, str]:
    """This process's environment as a user's shell has it (the venv's tools first on PATH), with `env` on top."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}


def sh(args: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """Runs a command as a user's shell would (the venv's tools first on PATH); fails the test on error."""
    proc = subprocess.run(args, cwd=cwd, env=shell_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def set_args(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("-S", o)]


# What a pipeline run leaves in a checkout (the README's first command: `dvc exp run` applies its params to
# params.yaml and stages it with dvc.lock; the stages write models/, metrics/, reports/, the prepared data and
# checkpoints; MLflow its store). A test's project never takes them from the work tree: the tests take the code
# as it stands, never a run's state. tests/unit/test_checkout.py holds every dvc.yaml output to this list.
RUN_STATE = ("params.yaml", "dvc.lock", "models/", "metrics/", "reports/", "data/prepared/", "checkpoints/",
             "mlflow.db", "mlruns/", "mlartifacts/", ".dvc/tmp/", ".dvc/cache/")


def is_run_state(name: str) -> bool:
    return name.startswith(RUN_STATE) or f"{name}/" in RUN_STATE


def default_params() -> dict:
    """The project's default params: conf/ composed with the default profile, as the committed params.yaml
    must be (tests/unit/test_config.py), whatever an experiment applied to the checkout's params.yaml."""
    return compose([])


def copy_project(source: Path, dest: Path) -> Path:
    """The project's files of the checkout `source` into `dest`: every file git tracks or would track, as the
    work tree has it (a developer's uncommitted change is tested), except a run's state (RUN_STATE). Of that,
    params.yaml is the composed default, and other tracked files are taken as committed (DVC stages what it
    writes, so neither work tree nor index will do); untracked ones are left out."""
    dest.mkdir(parents=True, exist_ok=True)
    listed = lambda *args: subprocess.run(["git", "ls-files", "-z", *args], cwd=source, capture_output=True,  # noqa: E731
                                          check=True).stdout.decode().split("\0")
    committed = set(filter(None, subprocess.run(["git", "ls-tree", "-r", "-z", "--name-only", "HEAD"], cwd=source,
                                                capture_output=True, check=True).stdout.decode().split("\0")))
    for name in filter(None, listed("--cached", "--others", "--exclude-standard")):
        target = dest / name
        if name == "params.yaml":
            target.write_text(yaml.safe_dump(default_params(), sort_keys=False))
        elif is_run_state(name):
            if name in committed:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(subprocess.run(["git", "show", f"HEAD:{name}"], cwd=source, capture_output=True,
                                                  check=True).stdout)
        elif (source / name).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target)
    return dest


def clone_project(dest: Path, source: Path = REPO) -> Path:
    """A fresh git repository holding the project's files (copy_project), as a user's clone would, with its DVC
    remote in a folder of the test's own."""
    copy_project(source, dest)
    for args in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                 ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        sh(args, dest)
    sh([str(BIN / "dvc"), "remote", "modify", "--local", "local", "url", str(dest.parent / "dvc-remote")], dest)
    return dest


def as_the_offline_run_leaves_it(checkout: Path, run: Path) -> Path:
    """`checkout` changed as the README's first command leaves a user's: params.yaml applied with the offline
    profile and staged, and the state of the pipeline run in `run` (dvc.lock staged, models, metrics, reports,
    prepared data, the MLflow store) laid over it."""
    (checkout / "params.yaml").write_text(yaml.safe_dump(compose(["profile=offline"]), sort_keys=False))
    for name in RUN_STATE:
        source, target = run / name, checkout / name
        if name == "params.yaml" or not source.exists():
            continue
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
    subprocess.run(["git", "add", "params.yaml", "dvc.lock"], cwd=checkout, check=True, capture_output=True)
    return checkout


# Credentials a user may have in the environment; none may reach MLflow (tests/e2e/test_pipeline.py).
FAKE_SECRETS = {"HF_TOKEN": "hf_FAKEtoken0123456789", "AWS_SECRET_ACCESS_KEY": "FAKEawsSecret/0123456789",
                "MLFLOW_TRACKING_PASSWORD": "FAKEmlflowPassword0123", "AWS_ACCESS_KEY_ID": "AKIAFAKE0123456789"}


def git(repo: Path, *args: str) -> str:
    return sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], repo).stdout.strip()


# A session started by another (tests/e2e/test_hermetic.py) is handed that session's tiny_repo here, and
# copies it instead of running the same `dvc repro` a second time.
TINY_REPO_ENV = "FASHIONCAP_TESTS_TINY_REPO"


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A user's clone with the tiny offline params committed, `dvc repro` run (with credentials in the
    environment that must never reach MLflow) and its results committed, as one would push them. Built
    once per session (or copied from the session that started this one); end-to-end tests work on their
    own copies (copy_repo) and never change it."""
    if given := os.environ.get(TINY_REPO_ENV):
        return copy_repo(Path(given), tmp_path_factory.mktemp("tiny-repo") / "repo")
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _build_tiny_repo(tmp_path_factory.mktemp("tiny-repo"))
    # under pytest-xdist: built once for the run, and each worker works from a copy of its own (a DVC command
    # takes the repository's lock, which two workers would contend for)
    shared = built_once(tmp_path_factory, "tiny-repo", _build_tiny_repo) / "repo"
    return copy_repo(shared, tmp_path_factory.mktemp("tiny-repo") / "repo")


def _build_tiny_repo(root: Path) -> Path:
    repo = clone_project(root / "repo")
    params = compose([*TINY_OVERRIDES, "evaluate.meteor=true"])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "commit", "-qam", "tiny params")
    sh([str(BIN / "dvc"), "repro"], repo, **FAKE_SECRETS, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny results")
    return repo


def pending(status: dict) -> dict:
    """`dvc status --json` less the init stage's standing "always changed" (it re-resolves model.init on every
    run, and changes nothing after it while the record stays the same): what a repro would really redo."""
    return {stage: changes for stage, changes in status.items() if changes != ["always changed"]}


def copy_repo(repo: Path, dest: Path) -> Path:
    """A copy of a project clone at `dest` that works as if it had been made there: its MLflow store's
    absolute paths (experiment and run artifact locations, model version sources) and its DVC remote
    (a folder beside the repository) point into the copy, so nothing it does touches the original."""
    import sqlite3

    shutil.copytree(repo, dest, symlinks=True)
    shutil.rmtree(dest / ".dvc" / "tmp", ignore_errors=True)  # locks and experiment workspaces of the original
    if (repo.parent / "dvc-remote").is_dir():
        shutil.copytree(repo.parent / "dvc-remote", dest.parent / "dvc-remote")
    sh([str(BIN / "dvc"), "remote", "modify", "--local", "local", "url", str(dest.parent / "dvc-remote")], dest)
    if (dest / "mlflow.db").is_file():
        old, new = str(repo), str(dest)
        with contextlib.closing(sqlite3.connect(dest / "mlflow.db")) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for column in [r[1] for r in db.execute(f"PRAGMA table_info('{table}')") if "CHAR" in r[2].upper()
                               or "TEXT" in r[2].upper()]:
                    db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?)',
                               (old, new, old))
            db.commit()
    return dest


@contextlib.contextmanager
def background_server(args: list[str], ready_url: str, log_path: Path, cwd: Path, env: dict | None = None,
                      timeout: float = 120):
    """Starts a server in its own process group, waits until `ready_url` answers 200, yields its PID and
    stops the whole group (workers included) afterwards."""
    with contextlib.ExitStack() as stack:
        try:
            pid = stack.enter_context(process(args, answers(ready_url), log_path, env=env, timeout=timeout, cwd=cwd))
        except RuntimeError as error:  # it exited or never answered: the log says why
            pytest.fail(str(error))
        yield pid
