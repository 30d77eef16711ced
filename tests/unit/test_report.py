"""The HTML report and the evaluation tables it is built from: pure functions on small inputs."""

from __future__ import annotations

import io
import re

from PIL import Image

from fashioncap.evaluate import TABLE_THUMBNAIL, per_category, prediction_table, score_table
from fashioncap.plots import caption_panel
from fashioncap.tracking import mlflow_metrics
from fashioncap.report import data_uri, outcome, render, select_gallery


def prediction(i: int, before: float, after: float, category: str = "watch") -> dict:
    return {"key": f"k{i:03d}", "category": category, "reference": f"a watch number {i}", "before": "a bag",
            "after": f"a watch {i}", "novel": True, "cider_d_before": before, "cider_d_after": after}


def png(colour=(10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_gallery_shows_the_biggest_gains_and_losses_and_a_sample_of_the_rest():
    preds = [prediction(i, 1.0, 1.0 + (i - 10) / 10) for i in range(30)]  # k000..k009 worse, k010 same
    gallery = select_gallery(preds, 12, seed=1)
    helped, hurt, sample = gallery.values()
    assert [p["key"] for p in helped] == ["k029", "k028", "k027", "k026"]
    assert [p["key"] for p in hurt] == ["k000", "k001", "k002", "k003"]
    assert len(sample) == 4 and not {p["key"] for p in sample} & {p["key"] for p in helped + hurt}
    assert select_gallery(preds, 12, seed=1) == gallery  # seeded: the same page for the same run


def test_gallery_fills_up_with_the_sample_when_nothing_got_worse():
    preds = [prediction(i, 0.0, 1.0) for i in range(10)]
    helped, hurt, sample = select_gallery(preds, 6, seed=0).values()
    assert len(helped) == 2 and hurt == [] and len(sample) == 4


def test_outcome_compares_per_item_scores():
    assert outcome(0.2, 0.9) == "better" and outcome(0.9, 0.2) == "worse" and outcome(0.5, 0.5) == "same"


def scores(value: float) -> dict:
    return {"bleu_1": value, "bleu_2": value, "bleu_3": value, "bleu_4": value, "cider_d": value, "rouge_l": value}


def test_report_is_self_contained_with_every_gallery_image_embedded():
    preds = [prediction(i, 0.5, 0.5 + (-1) ** i * 0.1, "watch" if i % 2 else "bag") for i in range(8)]
    gallery = select_gallery(preds, 6, seed=0)
    shown = [p for items in gallery.values() for p in items]
    evaluation = {"test_items": 8, "before": scores(0.1), "after": scores(0.4),
                  "per_category": {"bag": {"items": 4, "before": scores(0.1), "after": scores(0.3)},
                                   "watch": {"items": 4, "before": scores(0.2), "after": scores(0.1)}}}
    training = {"steps": 10, "best_metric": "val_cider_d", "best_value": 0.5, "best_step": 8,
                "stop_reason": "reached train.max_steps (10)", "samples_per_second": 12.5}
    page = render("r", evaluation, training, preds, gallery, {p["key"]: png() for p in preds}, png((0, 0, 0)),
                  {"run": "abc<script>"})
    assert page.count("<img ") == len(shown) + 1  # the gallery and the loss curve
    assert len(re.findall(r"src='data:image/png;base64,", page)) == len(shown) + 1
    assert not re.search(r"(src|href)=['\"]?(https?:)?//|@import|url\(|<script|<link", page, re.I)
    assert "abc&lt;script&gt;" in page  # run metadata and captions are escaped
    assert "By category" in page and "watch (4)" in page and "bag (4)" in page
    assert page.count("class='card better'") + page.count("class='card worse'") == len(shown)


def test_images_in_other_formats_are_embedded_as_png():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="BMP")
    assert data_uri(buf.getvalue()).startswith("data:image/png;base64,")
    assert data_uri(png()).startswith("data:image/png;base64,")


def test_per_category_scores_and_their_mlflow_names():
    refs = ["a red bag", "a blue bag", "a gold watch", "a silver watch"]
    before = ["a bag", "a bag", "a bag", "a bag"]
    after = ["a red bag", "a blue bag", "a gold watch", "a steel watch"]
    cats = per_category(["bag", "bag", "watch", None], refs, before, after)
    assert set(cats) == {"bag", "watch"} and cats["bag"]["items"] == 2 and cats["watch"]["items"] == 1
    assert cats["bag"]["after"]["bleu_1"] > cats["bag"]["before"]["bleu_1"]
    assert per_category([None] * 4, refs, before, after) == {}
    table = score_table(refs, before, after, [True] * 4) | {"per_category": cats}
    names = mlflow_metrics(table)
    assert names["category/bag/test_after_bleu_4"] == cats["bag"]["after"]["bleu_4"]
    assert "test_after_cider_d" in names


def test_prediction_table_has_one_row_per_image():
    preds = [prediction(i, 0.1, 0.2) for i in range(3)]
    images = [Image.new("RGB", (8, 8)) for _ in preds]
    table = prediction_table(preds, images, limit=10)
    assert list(table)[0] == "image" and table["key"] == ["k000", "k001", "k002"]
    assert all(len(column) == 3 for column in table.values())


def test_prediction_table_is_bounded_and_holds_thumbnails_not_full_images():
    """evaluate.table_images bounds what a run stores in MLflow: a real test split has ~1,000 images."""
    preds = [prediction(i, 0.1, 0.2) for i in range(5)]
    images = [Image.new("RGB", (384, 384), "red") for _ in preds]
    table = prediction_table(preds, images, limit=2)
    assert table["key"] == ["k000", "k001"] and all(len(column) == 2 for column in table.values())
    assert {image.size for image in table["image"]} == {(TABLE_THUMBNAIL, TABLE_THUMBNAIL)}


def test_caption_panel_puts_each_image_beside_the_next():
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    panel = caption_panel(images, ["a red thing"] * 3, ["ref"] * 3, width=100)
    assert panel.size[0] == 300 and panel.size[1] > 100
    assert panel.getpixel((50, 50)) == (255, 0, 0) and panel.getpixel((150, 50)) == (0, 0, 255)
