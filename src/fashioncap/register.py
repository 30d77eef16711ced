"""Stage `register`: log the best checkpoint as an MLflow model, register it, alias it `candidate`."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import tempfile
from importlib import metadata
from pathlib import Path

from . import adapters, faults, lineage, origin, promotion, tracking
from .config import BASE_TEST, Params, load_params
from .gates import Gate
from .runtime import FashioncapError, run_stage, stage_args

log = logging.getLogger(__name__)

# What predict() imports; MLflow's own inference of requirements misses pillow. Where a package ships as
# alternative distributions (mlflow or the lighter mlflow-skinny), the first one installed is pinned.
SERVING_PACKAGES = ("torch", "transformers", "peft", "pillow", "pydantic", "pyyaml", "pandas", ("mlflow", "mlflow-skinny"),
                    "safetensors")


def pip_requirements() -> list[str]:
    """The serving packages pinned to the versions installed here (local build suffixes dropped)."""
    pins = []
    for names in SERVING_PACKAGES:
        for name in (names,) if isinstance(names, str) else names:
            try:
                pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            raise metadata.PackageNotFoundError(f"none of {names} is installed")
    return pins


def serving_config(params: Params) -> dict:
    """Generation defaults and per-request limits the served model applies."""
    generate = params.generate.model_dump()
    generate["batch_size"] = max(generate["batch_size"], params.registry.max_images)  # one request, one batch
    return {"generate": generate, "image_size": params.model.image_size, "max_images": params.registry.max_images,
            "max_pixels": params.registry.max_pixels, "max_request_bytes": params.registry.max_request_bytes,
            "request_timeout": params.registry.request_timeout, "mixed_precision": params.train.mixed_precision,
            "numerics": {"cpu_kernels": params.numerics.cpu_kernels, "threads": params.numerics.threads},
            "attention": params.model.attention,
            "batch_images": params.registry.batch_images, "batch_wait_ms": params.registry.batch_wait_ms}


def signature(params: Params):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("num_beams", "long", params.generate.num_beams),
                            ParamSpec("max_new_tokens", "long", params.generate.max_new_tokens),
                            # "row": a bad image is a row with an error (batch jobs); "raise": HTTP 400
                            ParamSpec("errors", "string", "raise")]),
    )


def input_example(data_dir: Path):
    """One test image of the prepared data, base64-encoded, as the logged input example."""
    import datasets
    import pandas as pd

    row = datasets.load_from_disk(str(data_dir))["test"].cast_column("image", datasets.Image(decode=False))[0]
    return pd.DataFrame({"image": [base64.b64encode(row["image"]["bytes"]).decode()]})


def model_card(params: Params, table: dict, run, init: dict | None = None, replayed: dict | None = None,
               corrected: dict | None = None) -> str:
    """A short model card for the version description."""
    b, a = table["before"], table["after"]
    init = init or origin.record_of(params.model.init)
    what = (f"A LoRA adapter (r={params.train.lora.r}, on {', '.join(params.train.lora.targets)}) for "
            f"{origin.describe(init)}, merged into it when loaded"
            if params.train.method == "lora" else f"Fashion product captioner fine-tuned from {origin.describe(init)}")
    source = {"hub": f"Hub dataset `{params.data.hub_id}` @ `{params.data.revision}`",
              "imagefolder": f"local imagefolder `{params.data.path}`",
              "synthetic": f"synthetic catalogue ({params.data.synthetic.items} items of its "
                           f"{params.data.synthetic.part} part, seed {params.seed})"}
    return "\n".join([
        f"{what} ({params.profile} profile).",
        f"Data: {source[params.data.source]}; test split of {table['test_items']} items, "
        f"{table['novel_items']} with captions unseen in training."
        + (f" Replay: {replayed['items']} items of {replayed['source']}'s own training data mixed in, "
           f"{float(replayed['fraction']):.0%} of the new training set." if replayed else "")
        + (f" Reviewers' corrections used: {corrected['captions']} captions, {corrected['photos']} new photos."
           if corrected and (int(corrected["captions"]) or int(corrected["photos"])) else ""),
        f"Test CIDEr-D {b['cider_d']:.3f} -> {a['cider_d']:.3f}, BLEU-4 {b['bleu_4']:.3f} -> {a['bleu_4']:.3f}, "
        f"ROUGE-L {b['rouge_l']:.3f} -> {a['rouge_l']:.3f}"
        + (f", METEOR {b['meteor']:.3f} -> {a['meteor']:.3f}" if "meteor" in a else "")
        + " (before -> after fine-tuning).",
        *([f"Forgetting: CIDEr-D {table[BASE_TEST]['before']['cider_d']:.3f} -> "
           f"{table[BASE_TEST]['after']['cider_d']:.3f} on the test split of the catalogue it was adapted from "
           f"({table[BASE_TEST]['items']} items)."] if BASE_TEST in table else []),
        "Promotion gates (`fashioncap promote`): " + "; ".join(Gate.of(g).describe() for g in params.registry.gates)
        + ".",
        f"Run {run.info.run_id}, git commit {run.data.tags.get('mlflow.source.git.commit', 'unknown')}.",
        "Input: base64-encoded images (column `image`); output: one caption per image.",
        "Limitations: describes products in the style of its training captions; English only; "
        "scores are from a single reference per image.",
    ])


@contextlib.contextmanager
def storing(run_id: str):
    """Uploads to the run's artifacts: an artifact store that does not take them (S3 down, also after MLflow's
    retries) is one clear error, before anything is registered."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as error:  # requests' errors are OSErrors
        raise FashioncapError(
            f"the model could not be stored in run {run_id}'s artifact store ({str(error)[:400]}). Nothing was "
            f"registered: run the stage again (`dvc repro`) once the store ({tracking.tracking_uri()} and the "
            "artifact storage behind it) answers") from error


def log_lineage(client, run_id: str, model_dir: Path) -> None:
    """Adds what the whole pipeline used to its run: params.yaml, dvc.lock and the model's DVC digest."""
    digest = lineage.lock_digests(Path("dvc.lock")).get(model_dir.as_posix())
    if digest:
        client.set_tag(run_id, "model.digest", digest)
    for path in ("params.yaml", "dvc.lock"):
        if Path(path).is_file():
            client.log_artifact(run_id, path, artifact_path="lineage")


def register(params: Params, run_id: str, model_dir: Path, data_dir: Path, table: dict, init: dict | None = None):
    """Logs and registers the model once per run and registration (served config and evaluation: a change in
    either is a new version), then points `candidate` at it; returns the version number."""
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    with storing(run_id):
        log_lineage(client, run_id, model_dir)
    name = params.registry.name
    registration = registration_digest(params, table)
    version = promotion.version_for_run(client, name, run_id, registration)
    if version is not None:
        log.info("run %s is already registered as %s version %s with this served config and evaluation", run_id,
                 name, version.version)
    else:
        earlier = promotion.version_for_run(client, name, run_id)
        if earlier is not None:
            log.warning("run %s is registered as %s version %s with another served config or evaluation: "
                        "registering a new version", run_id, name, earlier.version)
        version = _log_and_register(params, run_id, model_dir, data_dir, table, client, registration,
                                    init or origin.record_of(params.model.init))
    number = str(version.version)
    client.set_registered_model_alias(name, promotion.CANDIDATE, number)
    log.info("%s@%s -> version %s", name, promotion.CANDIDATE, number)
    return number


def base_reference(base: dict) -> str:
    """How a LoRA version names its base, pinned: a registry version, or a Hub id at its commit. A base that a
    server elsewhere could not reach (a local directory, a Hub id without its commit) is refused."""
    if base["kind"] == "registry":
        return base["uri"]
    if base["kind"] == "hub" and base.get("revision"):
        return f"{base['init']}@{base['revision']}"
    raise FashioncapError(
        f"a LoRA version must name a base that serving can load again, but this adapter's base is "
        f"{'the local directory' if base['kind'] == 'local' else 'the Hub id'} '{base['init']}'"
        f"{'' if base['kind'] == 'local' else ' without its commit'}: train it from a registry version "
        "(model.init models:/NAME/N or models:/NAME@ALIAS) or a Hub id, or with train.method full")


def registration_digest(params: Params, table: dict) -> str:
    """What a version of this run serves and was evaluated with: its served config (generation, limits,
    batching, numerics) and the evaluation's table (test digest, scores)."""
    payload = json.dumps({"serving_config": serving_config(params), "evaluation": table, "profile": params.profile},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _log_and_register(params: Params, run_id: str, model_dir: Path, data_dir: Path, table: dict, client,
                      registration: str, init: dict):
    import mlflow

    from . import serving  # what a version serves: its entry file, served_model.py, builds serving.Captioner

    run = client.get_run(run_id)
    method = {"method": "full"}
    if adapters.is_adapter(model_dir):
        base = adapters.base_of(model_dir)
        method = {"method": "lora", "base": base_reference(base)}
    with tempfile.TemporaryDirectory() as tmp, tracking.resume_run(run_id):
        config = Path(tmp) / "serving_config.json"
        config.write_text(json.dumps(serving_config(params), indent=2))
        with storing(run_id):
            info = mlflow.pyfunc.log_model(
                name="captioner", python_model=str(Path(serving.__file__).with_name("served_model.py")), code_paths=[str(Path(__file__).parent)],
                artifacts={"blip": str(model_dir), "serving_config": str(config)},
                signature=signature(params), input_example=input_example(data_dir),
                pip_requirements=pip_requirements())
    replayed = {k.removeprefix("replay."): v for k, v in run.data.tags.items() if k.startswith("replay.")}
    corrected = {k.removeprefix("corrections."): v for k, v in run.data.tags.items() if k.startswith("corrections.")}
    tags = {promotion.DIGEST_TAG: table["test_digest"], promotion.RUN_TAG: run_id, promotion.PROFILE_TAG: params.profile,
            "model_digest": run.data.tags.get("model.digest", "unknown"),
            promotion.COMMIT_TAG: run.data.tags.get("mlflow.source.git.commit", "unknown"),
            promotion.REGISTRATION_TAG: registration, **promotion.score_tags(table),
            promotion.GATES_TAG: json.dumps([g.model_dump() for g in params.registry.gates]),
            **{f"replay_{k}": v for k, v in replayed.items()},  # the init's training items mixed in (train's tags)
            **{f"corrections_{k}": v for k, v in corrected.items()},  # reviewers' corrections trained on
            **{k.replace(".", "_"): v for k, v in origin.Init(init, init["init"]).tags.items()}, **method}
    faults.point("register.logged")
    version = mlflow.register_model(info.model_uri, params.registry.name, tags=tags)
    client.update_model_version(params.registry.name, version.version,
                                description=model_card(params, table, run, init, replayed, corrected))
    faults.point("register.registered")
    return version


def main(argv: list[str] | None = None) -> None:
    args = stage_args(__doc__, argv, "data", "model_dir", "run_ref", "eval", "out")
    params = load_params(args.params)
    table = json.loads(args.eval.read_text())
    run_id = tracking.stage_run(params, tracking.read_run_ref(args.run_ref), "register")
    version = register(params, run_id, args.model_dir, args.data, table, origin.record_of(params.model.init, args.init))
    args.out.write_text(json.dumps({"name": params.registry.name, "version": version,
                                          "run_id": run_id}, indent=2) + "\n")


if __name__ == "__main__":
    run_stage(main)
