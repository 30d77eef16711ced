"""Reviewers' corrections reach the prepared data, and the review worklist puts the least sure captions first."""

import json

import pytest

from fashioncap import feedback
from fashioncap.feedback import apply, check
from tests.unit.test_feedback import lines, png


def test_a_correction_reaches_the_prepared_training_data_in_the_split_of_its_key(tmp_path, tiny_params):
    from fashioncap.prepare import build_splits

    rows, _ = build_splits(tiny_params)
    split, row, other = "test", rows["test"][0], rows["train"][0]
    png(tmp_path / "new.png", colour=(10, 200, 10))
    corrections = check(lines({"key": row["key"], "caption": "a corrected caption for a test product"},
                              {"key": other["key"], "caption": "a corrected caption for a training product"},
                              {"image": "new.png", "caption": "a green square scarf"}),
                        tmp_path, {row["key"], other["key"]}, tiny_params.data)
    apply(corrections, tmp_path / "corrections")
    used = {"captions": 0, "photos": 0}
    again, _ = build_splits(tiny_params, tmp_path / "corrections", used)
    captions = {s: {r["key"]: r["caption"] for r in again[s]} for s in again}
    assert captions[split][row["key"]] == "a corrected caption for a test product"
    assert captions["train"][other["key"]] == "a corrected caption for a training product"
    photo = feedback.photo_key((tmp_path / "new.png").read_bytes())
    assert sum(photo in captions[s] for s in captions) == 1 and used == {"captions": 2, "photos": 1}
    assert sum(map(len, again.values())) == sum(map(len, rows.values())) + 1  # one product more, none lost


def test_the_review_worklist_puts_the_least_sure_captions_first_and_feeds_back(registry_env, tiny_params, tmp_path):
    import datasets
    import mlflow
    import torch

    from fashioncap import review
    from fashioncap.register import register
    from tests.conftest import new_run, table

    client, model_dir, data_dir = registry_env
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(1.0))
    uri = "models:/fashion-captioner/1"
    everything = review.review(uri, data_dir, 10_000, tmp_path / "all", ["test"])
    chosen = review.review(uri, data_dir, 5, tmp_path / "review", ["test"])
    assert [r["key"] for r in chosen] == [r["key"] for r in everything[:5]]  # the 5 least sure of all
    assert len(everything) == datasets.load_from_disk(str(data_dir))["test"].num_rows
    assert all(a["confidence"] <= b["confidence"] for a, b in zip(everything, everything[1:]))
    written = [json.loads(line) for line in (tmp_path / "review" / review.WORKLIST).read_text().splitlines()]
    assert written == chosen and all((tmp_path / "review" / r["photo"]).is_file() for r in written)
    page = (tmp_path / "review" / review.PAGE).read_text()
    assert page.count("<img src=\"data:image/") == 5 and chosen[0]["key"] in page
    # a confidence is the mean log-probability of the caption's tokens: minus transformers' own loss on them
    captioner = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    image = datasets.load_from_disk(str(data_dir))["test"].filter(lambda r: r["key"] == chosen[0]["key"])[0]["image"]
    from fashioncap.modeling import generation_kwargs, pixel_values

    pixels = pixel_values([image], captioner.processor.image_processor)
    with torch.no_grad():
        ids = captioner.model.generate(pixel_values=pixels, **generation_kwargs(captioner.generate))
        labels = ids.masked_fill(ids == captioner.model.config.text_config.pad_token_id, -100)
        loss = captioner.model(pixel_values=pixels, input_ids=ids, labels=labels).loss.item()
    assert chosen[0]["confidence"] == pytest.approx(-loss, abs=1e-4)
    # the worklist's lines are feedback lines: a reviewer corrects a caption and hands the file back
    keys = set(datasets.load_from_disk(str(data_dir))["test"]["key"])
    assert [c.key for c in check(review_lines(tmp_path / "review"), tmp_path, keys, tiny_params.data)] == \
        [r["key"] for r in chosen]


def review_lines(folder):
    from fashioncap import review

    return (folder / review.WORKLIST).read_text().splitlines()
