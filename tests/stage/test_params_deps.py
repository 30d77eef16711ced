"""dvc.yaml's params are the leaf keys each stage reads: a changed value re-runs exactly the stages that
read it. The stages run here in the test's process on the tiny configuration while every read of a
parameter is recorded; dvc.yaml must declare each one, and every key it declares must be one that the
stage's code can read."""

from __future__ import annotations

import ast
import contextlib
import copy
import json

import pytest
import yaml
from PIL import Image

from tests.conftest import REPO, default_params
from tests.unit.test_dvc_yaml import PACKAGE, imported_modules

pytestmark = pytest.mark.slow  # trains, evaluates and registers the tiny model


def section_prefixes() -> dict[type, str]:
    """Each params section's class and its dotted place in params.yaml (DataParams: 'data.')."""
    from fashioncap.config import Params, _Section

    prefixes: dict[type, str] = {Params: ""}

    def walk(cls: type, prefix: str) -> None:
        for name, field in cls.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, _Section):
                prefixes[field.annotation] = f"{prefix}{name}."
                walk(field.annotation, f"{prefix}{name}.")

    walk(Params, "")
    return prefixes


@contextlib.contextmanager
def recorded_reads(monkeypatch):
    """Yields the set of dotted leaf keys read from any params object while the block runs. Reads by the
    validation of a params file (rules across sections, e.g. generate.max_new_tokens >= model.max_caption_
    tokens) are not a stage's: the params file is validated whole whatever the stage."""
    from fashioncap import config
    from fashioncap.config import _Section

    prefixes, seen, validating = section_prefixes(), set(), []
    original = _Section.__getattribute__
    parse = config.parse_params

    def recording(self, name):
        value = original(self, name)
        cls = type(self)
        # a section inside a list (registry.gates' items) is read through its list's key, recorded there
        if not validating and cls in prefixes and name in cls.model_fields and not isinstance(value, _Section):
            seen.add(prefixes[cls] + name)
        return value

    def parse_quietly(raw):
        validating.append(True)
        try:
            return parse(raw)
        finally:
            validating.pop()

    def leaves(section, prefix: str) -> None:
        for name in type(section).model_fields:
            value = original(section, name)
            if isinstance(value, _Section):
                leaves(value, f"{prefix}{name}.")
            else:
                seen.add(prefix + name)

    def dumping(method):
        """model_dump() and its kin read every field of a section at once: each is a read. A dump of the whole
        params is a record of the configuration (the MLflow run's logged params, the checkpoint's identity),
        which no output depends on: not a read."""
        def dump(self, *args, **kwargs):
            if not validating and prefixes.get(type(self)):
                leaves(self, prefixes[type(self)])
            return method(self, *args, **kwargs)
        return dump

    for method in ("model_dump", "model_dump_json"):
        monkeypatch.setattr(_Section, method, dumping(getattr(_Section, method)))
    monkeypatch.setattr(_Section, "__getattribute__", recording)
    monkeypatch.setattr(config, "parse_params", parse_quietly)
    try:
        yield seen
    finally:
        monkeypatch.undo()


def declared(stage: str) -> set[str]:
    return set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["params"])


@pytest.fixture(scope="module")
def reads(tmp_path_factory, tiny_raw) -> dict[str, set[str]]:
    """The keys each stage read in one tiny run of the whole pipeline (synthetic catalogue), plus the
    keys prepare read on an imagefolder catalogue."""
    from fashioncap import evaluate, origin, prepare, register, report, train

    root = tmp_path_factory.mktemp("params-deps")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw))
    shop = root / "shop"
    shop.mkdir()
    for i in range(40):
        Image.new("RGB", (40, 40), (6 * i, 0, 0)).save(shop / f"p{i}.png")
    (shop / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"p{i}.png", "text": f"a red bag number {i}"}) + "\n" for i in range(40)))
    shop_params = root / "shop.yaml"
    shop_params.write_text(yaml.safe_dump({**tiny_raw, "data": {**tiny_raw["data"], "source": "imagefolder",
                                                                  "path": str(shop)}}))
    p = {name: str(root / name) for name in ("prepared", "best", "run.json", "ckpt", "train.json", "train_log.csv",
                                             "val_log.csv", "loss.png", "eval.json", "preds.jsonl", "report.html",
                                             "registered.json", "shop-prepared", "shop-prepare.json", "eval_run.json",
                                             "fingerprint.json")}
    runs = {
        "init": [(origin.main, ["--params", str(params), "--out", str(root / "models" / "init.json")])],
        "prepare": [(prepare.main, ["--params", str(params), "--out", p["prepared"], "--metrics", str(root / "p.json"),
                                    "--corrections", str(root / "corrections")]),
                    (prepare.main, ["--params", str(shop_params), "--out", p["shop-prepared"],
                                    "--metrics", p["shop-prepare.json"], "--corrections", str(root / "corrections")])],
        "train": [(train.main, ["--params", str(params), "--data", p["prepared"], "--model-dir", p["best"],
                                "--run-ref", p["run.json"], "--checkpoint-dir", p["ckpt"], "--metrics", p["train.json"],
                                "--train-log", p["train_log.csv"], "--val-log", p["val_log.csv"],
                                "--loss-curve", p["loss.png"], "--fingerprint", p["fingerprint.json"]])],
        "evaluate": [(evaluate.main, ["--params", str(params), "--data", p["prepared"], "--model-dir", p["best"],
                                      "--run-ref", p["run.json"], "--metrics", p["eval.json"],
                                      "--predictions", p["preds.jsonl"], "--eval-run-ref", p["eval_run.json"],
                                      "--attributes", str(REPO / "conf" / "attributes.yaml")])],
        "report": [(report.main, ["--params", str(params), "--data", p["prepared"], "--run-ref", p["eval_run.json"],
                                  "--predictions", p["preds.jsonl"], "--eval", p["eval.json"],
                                  "--train", p["train.json"], "--loss-curve", p["loss.png"], "--out", p["report.html"]])],
        "register": [(register.main, ["--params", str(params), "--data", p["prepared"], "--model-dir", p["best"],
                                      "--run-ref", p["eval_run.json"], "--eval", p["eval.json"],
                                      "--out", p["registered.json"]])],
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        found = {}
        for stage, calls in runs.items():
            with recorded_reads(pytest.MonkeyPatch()) as seen:
                for main, argv in calls:
                    main(argv)
            found[stage] = set(seen)
    return found


STAGES = ["init", "prepare", "train", "evaluate", "report", "register"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_parameter_a_stage_reads_is_one_of_its_params_deps(reads, stage):
    missing = reads[stage] - declared(stage)
    assert not missing, f"dvc.yaml: stage {stage} reads {sorted(missing)} but its params do not list them"
    assert reads[stage], "nothing recorded: the recorder is broken"


def test_the_check_notices_a_removed_param(reads):
    assert reads["train"] - (declared("train") - {"train.lr"}) == {"train.lr"}


def test_the_recorder_sees_reads_through_sections_and_properties(tiny_raw, monkeypatch):
    from fashioncap.config import parse_params

    params = parse_params(copy.deepcopy(tiny_raw))
    with recorded_reads(monkeypatch) as seen:
        data = params.data
        _ = data.synthetic.items, params.model.from_scratch, params.train.lr
    assert seen == {"data.synthetic.items", "model.init", "train.lr"}
    with recorded_reads(monkeypatch) as seen:
        params.numerics.model_dump()  # every field at once: what register's serving config once did
        params.data.synthetic.model_dump_json()
    assert seen == {"numerics.cpu_kernels", "numerics.threads", "numerics.deterministic",
                    "data.synthetic.items", "data.synthetic.render_size", "data.synthetic.part"}


def attribute_names(stage: str) -> set[str]:
    """Every `.name` the stage's modules (and those they import) access."""
    names = set()
    for module in imported_modules({"init": "origin"}.get(stage, stage)):
        for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_params_deps_are_leaf_keys_that_the_stages_code_can_read(stage):
    from fashioncap.config import flatten, parse_params

    leaves = set(flatten(parse_params(default_params())))
    keys = declared(stage)
    assert keys <= leaves, f"stage {stage}: not leaf keys of params.yaml: {sorted(keys - leaves)}"
    names = attribute_names(stage)
    unread = {k for k in keys if k.rsplit(".", 1)[-1] not in names}
    assert not unread, f"stage {stage} lists params its code never reads: {sorted(unread)}"
