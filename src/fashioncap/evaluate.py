"""Stage `evaluate`: caption the test split before and after fine-tuning and score both."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

from . import faults
from .config import BASE_TEST, Params, load_params
from .attributes import Vocabulary, attribute_scores, confusions
from .metrics import Meteor, caption_scores, per_item_cider_d
from .ptb import coco_tokens
from .fingerprint import mixed_precision
from .modeling import caption_all, initial_model, load_model
from .runtime import run_stage, stage_args
from . import fingerprint, origin, tracking

log = logging.getLogger(__name__)


def testset_digest(keys: list[str], references: list[str]) -> str:
    """Identifies the scored test set: scores compare only between versions with the same digest."""
    h = hashlib.sha256()
    for key, ref in sorted(zip(keys, references)):
        h.update(f"{key}\t{ref}\n".encode())
    return h.hexdigest()


def score_table(references: list[str], before: list[str], after: list[str], novel: list[bool],
                meteor: Meteor | None = None, vocabulary: Vocabulary | None = None) -> dict:
    """Before/after scores on the whole test split and on its items whose caption never occurs in training
    (METEOR too, given a Meteor)."""
    refs = [[r] for r in references]
    table = {"test_items": len(references), "novel_items": sum(novel),
             "before": caption_scores(refs, before, meteor), "after": caption_scores(refs, after, meteor)}
    if any(novel):
        pick = [i for i, n in enumerate(novel) if n]
        novel_refs = [refs[i] for i in pick]
        table["before_novel"] = caption_scores(novel_refs, [before[i] for i in pick], meteor)
        table["after_novel"] = caption_scores(novel_refs, [after[i] for i in pick], meteor)
    if vocabulary is not None:
        table["attributes"] = {"before": attribute_scores(vocabulary, refs, before),
                               "after": attribute_scores(vocabulary, refs, after),
                               "confusions_after": confusions(vocabulary, refs, after)}
    table["exact_match_after"] = sum(coco_tokens(a) == coco_tokens(r)
                                     for a, r in zip(after, references)) / len(references)
    return table


def per_category(categories: list[str | None], references: list[str], before: list[str],
                 after: list[str]) -> dict[str, dict]:
    """Before/after scores of each category (watches, bags, ...); empty when the data has none.
    CIDEr-D's IDF comes from each category's own items, as it would on a test set of that category."""
    groups: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        if category:
            groups.setdefault(category, []).append(i)
    out = {}
    for category, pick in sorted(groups.items()):
        refs = [[references[i]] for i in pick]
        out[category] = {"items": len(pick), "before": caption_scores(refs, [before[i] for i in pick]),
                         "after": caption_scores(refs, [after[i] for i in pick])}
    return out


def forgetting_table(references: list[str], before: list[str], after: list[str], meteor: Meteor | None = None,
                     vocabulary: Vocabulary | None = None) -> dict:
    """Before/after scores on the test split of the catalogue the initial model was trained on (BASE_TEST), and
    how much of each score adapting lost (`forgot`: before - after; positive is forgetting)."""
    refs = [[r] for r in references]
    table = {"items": len(references), "before": caption_scores(refs, before, meteor),
             "after": caption_scores(refs, after, meteor)}
    table["forgot"] = {name: table["before"][name] - table["after"][name] for name in table["after"]}
    if vocabulary is not None:
        table["attributes"] = {"before": attribute_scores(vocabulary, refs, before),
                               "after": attribute_scores(vocabulary, refs, after)}
    return table


def evaluate(params: Params, data_dir: Path, model_dir: Path, limit: int | None, meteor: Meteor | None = None,
             vocabulary: Vocabulary | None = None, init=None) -> tuple[dict, list[dict], list]:
    """Captions the test split with the initial and the fine-tuned weights (and, when the data has one, the base
    catalogue's test split: forgetting); returns scores, predictions and the test images."""
    import datasets
    import torch
    from transformers import BlipProcessor

    dataset = datasets.load_from_disk(str(data_dir))
    test = dataset["test"]
    if limit is not None:
        test = test.select(range(min(limit, len(test))))
    images, references = list(test["image"]), list(test["caption"])
    base = dataset[BASE_TEST] if BASE_TEST in dataset else None
    if base is not None and limit is not None:
        base = base.select(range(min(limit, len(base))))
    seen = set(dataset["train"]["caption"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = mixed_precision(params.train.mixed_precision)  # the training's, resolved on this machine
    processor = BlipProcessor.from_pretrained(model_dir)
    before_model = initial_model(params.model, processor, params.seed, init).to(device)
    before = caption_all(before_model, processor, images, params.generate, desc="caption (before)", precision=precision)
    if base is not None:
        base_before = caption_all(before_model, processor, list(base["image"]), params.generate,
                                  desc="caption base test (before)", precision=precision)
    del before_model
    after_model = load_model(model_dir, params.model.attention, known_base=init).to(device)  # an adapter: on init
    after = caption_all(after_model, processor, images, params.generate, desc="caption (after)", precision=precision)
    table = score_table(references, before, after, [r not in seen for r in references], meteor, vocabulary)
    if base is not None:
        base_after = caption_all(after_model, processor, list(base["image"]), params.generate,
                                 desc="caption base test (after)", precision=precision)
        table[BASE_TEST] = forgetting_table(list(base["caption"]), base_before, base_after, meteor, vocabulary)
        table[BASE_TEST]["test_digest"] = testset_digest(list(base["key"]), list(base["caption"]))
    table["test_digest"] = testset_digest(list(test["key"]), references)
    categories = list(test["category"])
    table["per_category"] = per_category(categories, references, before, after)
    refs = [[r] for r in references]
    # per-item CIDEr-D with the IDF of the whole test split: says which items fine-tuning helped or hurt
    scored = zip(test["key"], categories, references, before, after, per_item_cider_d(refs, before),
                 per_item_cider_d(refs, after))
    predictions = [{"key": k, "category": c, "reference": r, "before": b, "after": a, "novel": r not in seen,
                    "cider_d_before": round(sb, 4), "cider_d_after": round(sa, 4)}
                   for k, c, r, b, a, sb, sa in scored]
    return table, predictions, images


TABLE_THUMBNAIL = 192  # px, the report gallery's size: enough to see the product, ~20x smaller than a full PNG


def prediction_table(predictions: list[dict], images: list, limit: int) -> dict[str, list]:
    """The first `limit` predictions as columns for `mlflow.log_table`, each with a thumbnail of its test
    image: the UI's evaluation view lines runs up by `key` (the test split's order is the same in every
    run) and compares their captions image by image. Every prediction is in predictions.jsonl."""
    rows = predictions[:limit]
    thumbnails = [image.convert("RGB").resize((TABLE_THUMBNAIL, TABLE_THUMBNAIL)) for image in images[:limit]]
    return {"image": thumbnails, **{name: [p[name] for p in rows] for name in predictions[0]}}


def main(argv: list[str] | None = None) -> None:
    args = stage_args(__doc__, argv, "data", "model_dir", "run_ref", "metrics", "predictions", "attributes",
                      "eval_run_ref")
    params = load_params(args.params)
    fingerprint.pin(params.numerics.cpu_kernels, params.numerics.threads)  # before torch computes anything
    vocabulary = Vocabulary.load(args.attributes)
    # METEOR's Java starts first: without Java the stage stops in a second, naming evaluate.meteor
    with contextlib.ExitStack() as stack:
        meteor = stack.enter_context(Meteor()) if params.evaluate.meteor else None
        table, predictions, images = evaluate(params, args.data, args.model_dir, params.evaluate.max_items, meteor,
                                              vocabulary, origin.load(params.model.init, args.init))
    metrics, preds = args.metrics, args.predictions
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(table, indent=2) + "\n")
    preds.parent.mkdir(parents=True, exist_ok=True)
    preds.write_text("".join(json.dumps(p) + "\n" for p in predictions))
    faults.point("evaluate.written")
    logged = tracking.mlflow_metrics(table)
    run_id = tracking.stage_run(params, tracking.read_run_ref(args.run_ref), "evaluate", inherit_metric=lambda key:
                                key not in logged and not key.startswith(("test_", BASE_TEST)))
    with tracking.resume_run(run_id):
        import mlflow

        # captions are generated in the training's precision, resolved here: a machine without native bf16
        # (or one pinned below it) evaluates in fp32 and the fingerprint says so
        machine = fingerprint.fingerprint(Path.cwd(), mixed_precision(params.train.mixed_precision))
        tracking.check_machine(mlflow.active_run().info.run_id, machine, "changed_in_evaluate", "evaluating")
        mlflow.log_metrics(logged)
        mlflow.log_artifact(str(metrics))
        mlflow.log_artifact(str(preds))
        if params.evaluate.table_images:
            mlflow.log_table(prediction_table(predictions, images, params.evaluate.table_images),
                             artifact_file="predictions_table.json")
    tracking.write_run_ref(args.eval_run_ref, run_id, json.loads(args.run_ref.read_text())["experiment"])
    b, a = table["before"], table["after"]
    log.info("test CIDEr-D %.3f -> %.3f, BLEU-4 %.3f -> %.3f (%d items, %d with a caption unseen in training)",
             b["cider_d"], a["cider_d"], b["bleu_4"], a["bleu_4"], table["test_items"], table["novel_items"])
    if BASE_TEST in table:
        base = table[BASE_TEST]
        log.info("base catalogue's test split: CIDEr-D %.3f -> %.3f (forgot %.3f; %d items)", base["before"]["cider_d"],
                 base["after"]["cider_d"], base["forgot"]["cider_d"], base["items"])


if __name__ == "__main__":
    run_stage(main)
