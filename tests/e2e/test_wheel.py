"""The package installs by itself: its wheel, put into a fresh virtual environment that holds the runtime lock's
packages and nothing else (no test tool, no extra), passes `pip check`, scores the bundled COCO captions with
`fashioncap score` and captions an image with a registered model through `fashioncap caption`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from fashioncap.fingerprint import LOCK_FILES, lock_pins
from fashioncap.register import register
from tests.conftest import REPO, new_run, png_b64, table

pytestmark = pytest.mark.slow
NAME = "fashion-captioner"
TEST_TOOLS = ("pytest", "hypothesis", "pyspark", "psycopg", "boto3", "mkdocs", "seaweedfs")  # none may be there


def runtime_only_venv(root: Path) -> Path:
    """A fresh venv whose site-packages holds every distribution of the runtime lock, file by file as its
    RECORD lists them, linked from this environment (the same bits, no download): a `pip install -r
    requirements.lock` without the network. Returns its python."""
    import torch

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    lock = LOCK_FILES["cuda" if torch.cuda.is_available() else "cpu"]
    for name in lock_pins((REPO / lock).read_text()):
        dist = metadata.distribution(name)
        for file in dist.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:  # scripts outside site-packages; caches
                continue
            source, target = Path(dist.locate_file(file)), site / file
            if source.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source)
    return python


def test_the_wheel_alone_with_the_runtime_lock_scores_and_captions(tmp_path, registry_env, tiny_params):
    # the wheel, built from a copy of the package's sources (a build in place would write into the work tree)
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fashioncap-*.whl")

    python = runtime_only_venv(tmp_path / "venv")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    check = subprocess.run([*pip, "--python", str(python), "check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr  # every requirement the wheel declares is there
    absent = subprocess.run([str(python), "-c", "import importlib.util, sys; print([m for m in sys.argv[1:] "
                             "if importlib.util.find_spec(m)])", *TEST_TOOLS], capture_output=True, text=True,
                            check=True)
    assert absent.stdout.strip() == "[]", absent.stdout  # a runtime environment: no test tool, no extra

    # outside the project (no conf/, no src/ on the path), as a user of the package would run it
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env['PATH']}"
    captions = [json.loads(line) for line in (REPO / "tests" / "data" / "coco_val2014_captions.jsonl")
                .read_text().splitlines()[:60]]
    refs, preds = work / "refs.jsonl", work / "preds.jsonl"
    refs.write_text("".join(json.dumps({"id": i, "references": [c["caption"] for c in captions[i:i + 5]]}) + "\n"
                            for i in range(0, 50, 5)))
    preds.write_text("".join(json.dumps({"id": i, "caption": captions[i + 5]["caption"]}) + "\n"
                             for i in range(0, 50, 5)))
    scored = subprocess.run([str(python.parent / "fashioncap"), "score", "--references", str(refs), "--predictions",
                             str(preds), "--json"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    scores = json.loads(scored.stdout)
    assert {"bleu_4", "cider_d", "rouge_l", "meteor"} <= set(scores) and 0 < scores["meteor"] < 1, scores
    assert not [k for k in scores if k.startswith("attr/")]  # outside the project: no attribute vocabulary

    _, model_dir, data_dir = registry_env
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(1.0))
    (work / "red.png").write_bytes(base64.b64decode(png_b64()))
    captioned = subprocess.run([str(python.parent / "fashioncap"), "caption", "--model",
                                f"models:/{NAME}@candidate", "--json", str(work / "red.png")], cwd=work,
                               env={**env, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]},
                               capture_output=True, text=True, timeout=600)
    assert captioned.returncode == 0, captioned.stderr[-3000:]
    (line,) = captioned.stdout.splitlines()
    assert json.loads(line)["file"] == str(work / "red.png") and json.loads(line)["caption"].strip()
