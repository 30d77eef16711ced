"""Stage `report`: one self-contained HTML page per run: test images with their before/after captions,
per-category scores and the loss curve. No external scripts, styles or fonts; images are embedded."""

from __future__ import annotations

import base64
import html
import json
import logging
import random
from pathlib import Path

from PIL import Image

from .config import BASE_TEST, load_params
from .runtime import run_stage, stage_args
from . import faults, tracking

log = logging.getLogger(__name__)

METRICS = ("bleu_1", "bleu_4", "cider_d", "rouge_l", "meteor")
LABELS = {"bleu_1": "BLEU-1", "bleu_4": "BLEU-4", "cider_d": "CIDEr-D", "rouge_l": "ROUGE-L", "meteor": "METEOR"}

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1180px;color:#1d2330;
 padding:0 16px;background:#fafbfc}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #dde;padding-bottom:4px}
.meta{color:#5a6275;font-size:.9em}
table{border-collapse:collapse;margin:8px 0}td,th{padding:4px 10px;border-bottom:1px solid #e4e6ee;text-align:right}
th:first-child,td:first-child{text-align:left}.up{color:#137333}.down{color:#b3261e}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:14px}
.card{background:#fff;border:1px solid #dde;border-left:5px solid #9aa0ac;border-radius:6px;padding:10px}
.card.better{border-left-color:#1e8e3e}.card.worse{border-left-color:#d93025}
.card img{width:100%;max-width:240px;display:block;margin:0 auto 8px;image-rendering:auto}
.card p{margin:4px 0;font-size:.9em}.tag{display:inline-block;min-width:64px;margin-right:4px;font-weight:600;color:#5a6275}
.score{float:right;font-variant-numeric:tabular-nums;color:#5a6275}
.badge{font-size:.8em;font-weight:600;padding:1px 6px;border-radius:8px;background:#eceef3}
.better .badge{background:#e6f4ea;color:#137333}.worse .badge{background:#fce8e6;color:#b3261e}
img.curve{max-width:100%;border:1px solid #dde;background:#fff}
"""


def outcome(before: float, after: float) -> str:
    """'better', 'worse' or 'same': the fine-tuned caption's per-item CIDEr-D against the initial one's."""
    if abs(after - before) < 1e-9:
        return "same"
    return "better" if after > before else "worse"


def select_gallery(predictions: list[dict], size: int, seed: int) -> dict[str, list[dict]]:
    """Picks the test items to show: where fine-tuning helped most, where it hurt most, and a random
    sample of the rest, `size` in all (each section gets what the others leave)."""
    delta = sorted(predictions, key=lambda p: p["cider_d_after"] - p["cider_d_before"])
    worse = [p for p in delta if outcome(p["cider_d_before"], p["cider_d_after"]) == "worse"][: size // 3]
    better = [p for p in reversed(delta) if outcome(p["cider_d_before"], p["cider_d_after"]) == "better"]
    better = better[: size // 3]
    shown = {p["key"] for p in worse + better}
    rest = [p for p in predictions if p["key"] not in shown]
    sample = random.Random(seed).sample(rest, min(len(rest), size - len(worse) - len(better)))
    return {"Where fine-tuning helped most": better, "Where the fine-tuned caption is worse": worse,
            "A random sample of the test split": sorted(sample, key=lambda p: p["key"])}


def data_uri(data: bytes) -> str:
    """Embeds image bytes in the page; PNG and JPEG as they are, anything else re-encoded as PNG."""
    if data.startswith(b"\x89PNG"):
        mime = "image/png"
    elif data.startswith(b"\xff\xd8"):
        mime = "image/jpeg"
    else:
        import io

        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _scores_table(rows: list[tuple[str, dict, dict]]) -> str:
    shown = [m for m in METRICS if any(m in after for _, _, after in rows)]  # METEOR only when the run had it
    head = "".join(f"<th>{LABELS[m]} before</th><th>after</th>" for m in shown)
    body = []
    for name, before, after in rows:
        cells = []
        for m in shown:
            if m not in after:
                cells.append("<td>–</td><td>–</td>")
                continue
            a, b = round(after[m], 3), round(before[m], 3)  # coloured only where the shown digits differ
            cls = "up" if a > b else "down" if a < b else ""
            cells.append(f"<td>{before[m]:.3f}</td><td class='{cls}'>{after[m]:.3f}</td>")
        body.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def _card(p: dict, image: str) -> str:
    kind = outcome(p["cider_d_before"], p["cider_d_after"])
    badge = {"better": "after is better", "worse": "after is worse", "same": "no change"}[kind]
    lines = [("reference", p["reference"], None), ("before", p["before"], p["cider_d_before"]),
             ("after", p["after"], p["cider_d_after"])]
    text = "".join(
        f"<p><span class='tag'>{tag}</span>{html.escape(caption)}"
        + (f"<span class='score'>{score:.2f}</span>" if score is not None else "") + "</p>"
        for tag, caption, score in lines)
    category = f" · {html.escape(p['category'])}" if p.get("category") else ""
    return (f"<div class='card {kind}'><img src='{image}' alt='test image {html.escape(p['key'])}'>"
            f"<span class='badge'>{badge}</span> <span class='meta'>{html.escape(p['key'])}{category}</span>"
            f"{text}</div>")


def _attributes_section(attributes: dict, heading: str = "h2") -> str:
    """Per attribute type: precision, recall and F1 before and after, and the most frequent confusions."""
    def cell(value) -> str:
        return "–" if value is None else f"{value:.3f}"

    rows = []
    for kind, after in attributes["after"].items():
        before = attributes["before"][kind]
        if not after["expected"] and not after["stated"] and not before["stated"]:
            continue
        rows.append(f"<tr><td>{html.escape(kind)}</td>" + "".join(
            f"<td>{cell(before[m])}</td><td>{cell(after[m])}</td>" for m in ("precision", "recall", "f1"))
            + f"<td>{after['expected']}</td></tr>")
    head = ("<tr><th>attribute type</th><th>precision before</th><th>after</th><th>recall before</th><th>after</th>"
            "<th>F1 before</th><th>after</th><th>in references</th></tr>")
    confused = "".join(f"<li>{html.escape(c['type'])}: reference <b>{html.escape(c['reference'])}</b> → caption "
                       f"<b>{html.escape(c['caption'])}</b> ({c['count']}×)</li>"
                       for c in attributes.get("confusions_after", []))
    return (f"<{heading}>Attributes</{heading}><p>Colours, patterns, materials, garment types and details stated by "
            "the captions against those of the references (conf/attributes.yaml).</p>"
            f"<table>{head}{''.join(rows)}</table>"
            + (f"<h3>Most frequent confusions after fine-tuning</h3><ul>{confused}</ul>" if confused else ""))


def render(title: str, evaluation: dict, training: dict, predictions: list[dict], gallery: dict[str, list[dict]],
           images: dict[str, bytes], loss_curve: bytes | None, meta: dict[str, str]) -> str:
    """The report as one HTML string."""
    counts = {k: sum(outcome(p["cider_d_before"], p["cider_d_after"]) == k for p in predictions)
              for k in ("better", "worse", "same")}
    rows = [("whole test split", evaluation["before"], evaluation["after"])]
    if "after_novel" in evaluation:
        rows.append(("captions unseen in training", evaluation["before_novel"], evaluation["after_novel"]))
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p class='meta'>" + " · ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in meta.items())
             + "</p>",
             f"<h2>Test scores</h2><p>{evaluation['test_items']} test images; per-item CIDEr-D after fine-tuning is "
             f"<span class='up'>higher on {counts['better']}</span>, <span class='down'>lower on "
             f"{counts['worse']}</span> and unchanged on {counts['same']}.</p>", _scores_table(rows)]
    if evaluation.get("attributes"):
        parts.append(_attributes_section(evaluation["attributes"]))
    if BASE_TEST in evaluation:  # adapted from a model trained on another catalogue: what it forgot of that one
        base = evaluation[BASE_TEST]
        parts.append(f"<h2>Forgetting: the base catalogue's test split</h2><p>{base['items']} test images of the "
                     "catalogue the initial model was trained on, captioned by it (before) and by the adapted model "
                     f"(after): CIDEr-D {base['before']['cider_d']:.3f} &rarr; {base['after']['cider_d']:.3f}.</p>")
        parts.append(_scores_table([("base catalogue's test split", base["before"], base["after"])]))
        if base.get("attributes"):
            parts.append(_attributes_section(base["attributes"], heading="h3"))
    categories = evaluation.get("per_category") or {}
    if categories:
        parts.append("<h2>By category</h2>")
        parts.append(_scores_table([(f"{c} ({s['items']})", s["before"], s["after"]) for c, s in categories.items()]))
    parts.append(f"<h2>Training</h2><p>{training['steps']} steps, best {html.escape(training['best_metric'])} "
                 f"{training['best_value']:.4f} at step {training['best_step']} "
                 f"({html.escape(training['stop_reason'])}); {training['samples_per_second']} samples/s.</p>")
    if loss_curve:
        parts.append(f"<img class='curve' src='{data_uri(loss_curve)}' alt='loss curve'>")
    for section, items in gallery.items():
        if items:
            cards = "".join(_card(p, data_uri(images[p["key"]])) for p in items)
            parts.append(f"<h2>{html.escape(section)}</h2><div class='grid'>{cards}</div>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def stored_test_images(data_dir: Path, keys: set[str]) -> dict[str, bytes]:
    """The stored (already resized) bytes of the named test images, without decoding them."""
    import datasets

    test = datasets.load_from_disk(str(data_dir))["test"].cast_column("image", datasets.Image(decode=False))
    return {k: img["bytes"] for k, img in zip(test["key"], test["image"]) if k in keys}


def main(argv: list[str] | None = None) -> None:
    args = stage_args(__doc__, argv, "data", "run_ref", "predictions", "eval", "train", "loss_curve", "out")
    params = load_params(args.params)
    predictions = [json.loads(line) for line in args.predictions.read_text().splitlines() if line.strip()]
    gallery = select_gallery(predictions, params.report.gallery_items, params.seed)
    images = stored_test_images(args.data, {p["key"] for items in gallery.values() for p in items})
    run_id = tracking.stage_run(params, tracking.read_run_ref(args.run_ref), "report")
    meta = {"run": run_id, "profile": params.profile, "model": params.model.init, "data": params.data.hub_id
            if params.data.source == "hub" else params.data.source}
    page = render(f"fashioncap report: {params.tracking.experiment}", json.loads(args.eval.read_text()),
                  json.loads(args.train.read_text()), predictions, gallery, images,
                  args.loss_curve.read_bytes() if args.loss_curve.is_file() else None, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    faults.point("report.written")
    with tracking.resume_run(run_id):
        import mlflow

        mlflow.log_artifact(str(args.out))
    log.info("wrote %s (%.1f MB, %d images)", args.out, len(page) / 1e6, len(images))


if __name__ == "__main__":
    run_stage(main)
