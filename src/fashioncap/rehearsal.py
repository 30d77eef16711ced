"""`fashioncap rehearse`: the real job end to end without the Hub, with its time, memory and disk per stage.

Builds the stand-ins of `standins.py` in a Hugging Face home of its own (never the user's cache: the
stand-ins carry the real repository ids), then runs the default profile through `dvc exp run` with
`HF_HOME=<that folder> HF_HUB_OFFLINE=1` and only the step counts made tiny, and measures each stage.
It runs in isolation: a temporary copy of the work tree (its params.yaml, outputs and DVC experiments, not
yours), an MLflow store in that copy (whatever MLFLOW_TRACKING_URI says: a random-weights stand-in must never
become a team's champion) and a registry name of its own. Per stage it measures
wall time, peak memory of the stage's processes, and how much the repository grew. With `--serve` it
then promotes the new version, serves it with `fashioncap serve` and sends one request of the most
images the served model accepts, at catalogue size.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from .disk import human
from .runtime import FashioncapError

SIZES = {  # stand-in shapes: BLIP-base (or shrunk) and a slice of the catalogue at its photo size
    "full": {"shrunk": False, "items": 400, "shards": 4, "image_size": (1166, 1750)},
    "shrunk": {"shrunk": True, "items": 120, "shards": 3, "image_size": (583, 875)},
}
# Only step counts change: model, data, resolution, label smoothing, beams and lengths stay the default's.
STEP_OVERRIDES = {
    "full": ["train.allow_cpu=true", "train.batch_size=2", "train.max_steps=2",
             "train.warmup_steps=1", "train.eval_every=2", "train.checkpoint_every=1", "train.eval_samples=2",
             "train.log_every=1", "train.sample_images=2", "train.num_workers=0", "generate.batch_size=4",
             "evaluate.max_items=4", "report.gallery_items=4"],
    "shrunk": ["train.allow_cpu=true", "train.batch_size=4", "train.max_steps=4",
               "train.warmup_steps=1", "train.eval_every=2", "train.checkpoint_every=2", "train.eval_samples=4",
               "train.log_every=2", "train.sample_images=2", "train.num_workers=0", "generate.batch_size=8",
               "evaluate.max_items=6", "evaluate.table_images=4", "report.gallery_items=4"],
}
log = logging.getLogger(__name__)
STAGE_LINE = re.compile(r"Running stage '([\w-]+)'")
LIMIT_LINE = re.compile(r"serving at most (\d+) images per request")


class RehearsalError(FashioncapError):
    """A step of the rehearsal failed; the message holds the end of its output."""


@dataclass
class StageFigures:
    stage: str
    seconds: float
    peak_rss_bytes: int
    repo_bytes_after: int


REGISTRY_NAME = "fashion-captioner-rehearsal"
MARKER = ".fashioncap-standins"  # in a Hugging Face home the rehearsal made: one it may write into


def environment(hf_home: Path, work: Path) -> dict[str, str]:
    """The environment of a machine whose Hugging Face cache holds the stand-ins, with the Hub unreachable,
    and an MLflow store of the rehearsal's own in its work tree (no tracking or registry server, no
    credentials of the user's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DATABRICKS_"))}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(hf_home / "datasets"), "PYTHONUNBUFFERED": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}


def default_hf_home(size: str) -> Path:
    return Path.home() / ".cache" / "fashioncap" / f"hf-standins-{size}"


def check_hf_home(hf_home: Path, size: str) -> None:
    """Refuses a Hugging Face home that is the user's own cache, or a folder with other content (the default
    folder of the rehearsal excepted): the stand-ins carry the real repository ids (and `refs/main`), so they
    would shadow the real downloads."""
    from huggingface_hub import constants

    users = {Path(constants.HF_HOME).expanduser().resolve(), (Path.home() / ".cache" / "huggingface").resolve()}
    if hf_home.resolve() in users:
        raise RehearsalError(f"--hf-home {hf_home} is your Hugging Face cache: the stand-ins would shadow the real "
                             "model and dataset there. Give the rehearsal a folder of its own.")
    ours = hf_home.resolve() == default_hf_home(size).resolve() or (hf_home / MARKER).is_file()
    if hf_home.is_dir() and any(hf_home.iterdir()) and not ours:
        raise RehearsalError(f"--hf-home {hf_home} holds files the rehearsal did not make: give it an empty or new "
                             "folder (it writes stand-ins under the real repository ids)")
    hf_home.mkdir(parents=True, exist_ok=True)
    (hf_home / MARKER).write_text("stand-ins of `fashioncap rehearse`\n")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


# what a copy of a work tree without git leaves out: outputs, caches, stores and environments
_NOT_COPIED = (".git", ".venv", "venv", ".dvc/cache", ".dvc/tmp", "data/prepared", "models", "mlruns", "mlflow.db",
               "checkpoints", "reports", "metrics")


def work_tree_copy(repo: Path, dest: Path) -> Path:
    """A copy of the work tree as it is (committed, changed and new files) at `dest`, its own git repository
    (a clone: its own DVC experiments) where `repo` is one, a plain copy of its files otherwise."""
    import shutil

    try:
        _git(repo, "rev-parse", "--git-dir")
    except (OSError, subprocess.CalledProcessError):
        def ignore(folder: str, names: list[str]) -> set[str]:
            rel = Path(folder).relative_to(repo)
            return {n for n in names if (rel / n).as_posix().removeprefix("./") in _NOT_COPIED}

        shutil.copytree(repo, dest, ignore=ignore, symlinks=True)
        return dest
    subprocess.run(["git", "clone", "-q", str(repo), str(dest)], check=True, capture_output=True)
    changed = _git(repo, "ls-files", "-z", "--modified", "--others", "--exclude-standard").split("\0")
    for name in filter(None, changed):
        source, target = repo / name, dest / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for name in filter(None, _git(repo, "ls-files", "-z", "--deleted").split("\0")):
        (dest / name).unlink(missing_ok=True)
    return dest


def tree_bytes(folder: Path) -> int:
    """Bytes on disk under a folder, each file once however many hard links it has there."""
    seen, total = set(), 0
    for path in folder.rglob("*"):
        try:
            stat = path.lstat()
        except FileNotFoundError:  # removed while we walk (a checkpoint being swapped)
            continue
        if path.is_file() and not path.is_symlink() and (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_blocks * 512
    return total


class _PeakRss(threading.Thread):
    """Samples the resident memory of a process and all its children; `take()` returns the peak since
    the last call."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self.done = pid, interval, 0, threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                root = psutil.Process(self.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            self.done.wait(self.interval)

    def take(self) -> int:
        peak, self.peak = self.peak, 0
        return peak


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def run_pipeline(repo: Path, env: dict, overrides: list[str], name: str) -> list[StageFigures]:
    """`dvc exp run` of the default profile with the overrides; figures for each stage it ran."""
    args = [_bin("dvc"), "exp", "run", "-n", name, "-S", "profile=default", *(a for o in overrides for a in ("-S", o))]
    proc = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    sampler = _PeakRss(proc.pid)
    sampler.start()
    figures, tail, current, started = [], [], None, time.monotonic()

    def close(stage: str | None) -> None:
        if stage:
            figures.append(StageFigures(stage, round(time.monotonic() - started, 1), sampler.take(), tree_bytes(repo)))

    for line in proc.stdout:
        tail = (tail + [line])[-60:]
        if m := STAGE_LINE.search(line):
            close(current)
            current, started = m.group(1), time.monotonic()
            sampler.take()
            log.info("rehearsal: stage %s", current)
    code = proc.wait()
    close(current)
    sampler.done.set()
    if code != 0:
        raise RehearsalError("dvc exp run failed:\n" + "".join(tail))
    return figures


def stage_commands(repo: Path, params: Path) -> list[tuple[str, str]]:
    """Each stage's command from dvc.yaml, its variables filled in and pointed at `params`, for a machine
    without git and DVC (a bare GPU box): the same modules with the same paths, in pipeline order."""
    import yaml

    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    values = {f"paths.{k}": v for part in pipeline.get("vars", []) for k, v in part.get("paths", {}).items()}
    values["train.launcher"] = yaml.safe_load(params.read_text())["train"]["launcher"]
    commands = []
    for name, stage in pipeline["stages"].items():
        cmd = re.sub(r"\$\{([\w.]+)\}", lambda m: str(values[m.group(1)]), stage["cmd"])
        commands.append((name, f"{cmd} --params {params}"))
    return commands


def run_without_dvc(repo: Path, env: dict, overrides: list[str]) -> list[StageFigures]:
    """The stages one after the other as plain processes, with params composed from conf/ as
    `dvc exp run -S profile=default -S ...` composes them."""
    import yaml
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(repo / "conf"), version_base=None):
        raw = OmegaConf.to_container(compose(config_name="config", overrides=["profile=default", *overrides]),
                                     resolve=True)
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    figures = []
    for name, cmd in stage_commands(repo, params):
        log.info("rehearsal: stage %s", name)
        started = time.monotonic()
        proc = subprocess.Popen(cmd, shell=True, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        sampler = _PeakRss(proc.pid)
        sampler.start()
        output = proc.communicate()[0]
        sampler.done.set()
        if proc.returncode != 0:
            raise RehearsalError(f"stage {name} failed:\n{output[-3000:]}")
        figures.append(StageFigures(name, round(time.monotonic() - started, 1), sampler.take(), tree_bytes(repo)))
    return figures


def serve_full_request(repo: Path, env: dict, images: list[bytes], port: int, timeout_s: int) -> dict:
    """Promotes the candidate, serves the champion and sends one request of as many images as it accepts."""
    import base64

    subprocess.run([_bin("fashioncap"), "promote", "--force"], cwd=repo, env=env, check=True, capture_output=True)
    log_path = repo / "reports" / "rehearsal-serve.log"
    log_path.parent.mkdir(exist_ok=True)
    started = time.monotonic()
    with open(log_path, "w") as log:
        server = subprocess.Popen([_bin("fashioncap"), "serve", "--port", str(port), "--timeout", str(timeout_s)],
                                  cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        limit = None
        while limit is None:
            if server.poll() is not None or time.monotonic() - started > 900:
                raise RehearsalError("the server did not start:\n" + log_path.read_text()[-3000:])
            if m := LIMIT_LINE.search(log_path.read_text()):
                limit = int(m.group(1))
            time.sleep(1)
        while True:  # the limit is logged while the model loads; /ping answers once the server listens
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).close()
                break
            except OSError:
                time.sleep(1)
        ready = time.monotonic() - started
        batch = [base64.b64encode(images[i % len(images)]).decode() for i in range(limit)]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b] for b in batch]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        sent = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=timeout_s + 60) as response:
                status, answer = response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            status, answer = error.code, {"error": error.read().decode()[:500]}
        return {"ready_seconds": round(ready, 1), "images_per_request": limit, "status": status,
                "request_seconds": round(time.monotonic() - sent, 1), "request_bytes": len(body),
                "timeout_seconds": timeout_s, "first_caption": (answer.get("predictions") or [None])[0]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def rehearse(user_repo: Path, size: str, hf_home: Path, serve: bool, port: int, extra: list[str],
             use_dvc: bool = True, keep: bool = False) -> dict:
    """Builds the stand-ins, runs the pipeline on them in a temporary copy of the work tree (and serves the
    result); returns every figure, and the copy's path when `keep`, else removes the copy."""
    import shutil
    import tempfile

    check_hf_home(hf_home, size)
    work = Path(tempfile.mkdtemp(prefix=f"fashioncap-rehearsal-{size}-"))
    try:
        repo = work_tree_copy(user_repo, work / "repo")
        result = _rehearse(repo, size, hf_home, serve, port, extra, use_dvc)
        result["worktree"] = str(repo) if keep else None
        return result
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _rehearse(repo: Path, size: str, hf_home: Path, serve: bool, port: int, extra: list[str], use_dvc: bool) -> dict:
    from . import standins

    shape = SIZES[size]
    started = time.monotonic()
    built = standins.build(hf_home, shape["shrunk"], shape["items"], shape["shards"], shape["image_size"])
    build_seconds = round(time.monotonic() - started, 1)
    env = environment(hf_home, repo)
    before = tree_bytes(repo)
    overrides = [*STEP_OVERRIDES[size], f"registry.name={REGISTRY_NAME}", *extra]
    stages = (run_pipeline(repo, env, overrides, f"rehearsal-{size}") if use_dvc
              else run_without_dvc(repo, env, overrides))
    model, prepared = tree_bytes(repo / "models" / "best"), tree_bytes(repo / "data" / "prepared")
    growth = tree_bytes(repo) - before
    result = {"size": size, "stand_ins": built, "build_seconds": build_seconds,
              "stages": [asdict(s) for s in stages], "repo_growth_bytes": growth, "model_bytes": model,
              "prepared_bytes": prepared,
              "growth_over_model_and_data": round((growth - prepared) / model, 2) if model else None}
    if serve:
        import datasets

        shard = sorted(Path(built["dataset"]["path"]).glob("data/*.parquet"))[0]
        rows = datasets.Dataset.from_parquet(str(shard)).cast_column("image", datasets.Image(decode=False))
        photos = [row["image"]["bytes"] for row in rows.select(range(min(16, len(rows))))]
        from .config import load_params

        timeout = load_params(repo / "params.yaml").registry.request_timeout
        result["serving"] = serve_full_request(repo, env, photos, port, timeout)
    return result


def table(result: dict) -> str:
    """The figures as a short table for the terminal."""
    lines = [f"{'stage':<10}{'time':>10}{'peak RSS':>12}{'repo after':>13}"]
    lines += [f"{s['stage']:<10}{s['seconds']:>9.1f}s{human(s['peak_rss_bytes']):>12}{human(s['repo_bytes_after']):>13}"
              for s in result["stages"]]
    lines.append(f"repository grew by {human(result['repo_growth_bytes'])}: model {human(result['model_bytes'])}, "
                 f"prepared data {human(result['prepared_bytes'])}; (growth - data) / model = "
                 f"{result['growth_over_model_and_data']}")
    if "serving" in result:
        s = result["serving"]
        lines.append(f"serving: ready after {s['ready_seconds']} s; one request of {s['images_per_request']} catalogue "
                     f"photos -> HTTP {s['status']} in {s['request_seconds']} s (timeout {s['timeout_seconds']} s)")
    return "\n".join(lines)
