"""`fashioncap score`: files of references and predictions in, the pipeline's metrics out; bad input is
one line naming the file and line, exit 2."""

import json

import pytest

from fashioncap import cli
from fashioncap.metrics import caption_scores


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ended:
        cli.main(["score", *args])
    out = capsys.readouterr()
    return ended.value.code, out.out, out.err


@pytest.fixture
def files(tmp_path):
    refs = write(tmp_path / "refs.jsonl", [{"id": 1, "references": ["A red dress.", "a red gown"]},
                                           {"id": "b", "references": ["White trainers with 3.5 cm soles."]}])
    preds = write(tmp_path / "preds.jsonl", [{"id": "b", "caption": "White trainers, 3.5 cm soles"},
                                             {"id": 1, "caption": "a red dress"}])
    return refs, preds


def test_score_json_holds_the_pipelines_scores_paired_by_id(files, capsys):
    refs, preds = files
    code, out, _ = run(capsys, "--references", str(refs), "--predictions", str(preds), "--json", "--no-meteor",
                       "--no-attributes")
    assert code == 0
    expected = caption_scores([["A red dress.", "a red gown"], ["White trainers with 3.5 cm soles."]],
                              ["a red dress", "White trainers, 3.5 cm soles"])
    assert json.loads(out) == pytest.approx(expected)
    assert list(json.loads(out)) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d", "rouge_l"]
    code, table, _ = run(capsys, "--references", str(refs), "--predictions", str(preds), "--no-meteor")
    assert code == 0 and "CIDEr-D" in table and f"{expected['cider_d']:.4f}" in table
    assert "attr/colour/precision" in table  # the project's vocabulary by default: red, white


@pytest.mark.parametrize(("refs", "preds", "message"), [
    ([{"id": 1, "references": ["a"]}, '{"id": 2, "references": ['], [{"id": 1, "caption": "a"}],
     "refs.jsonl:2: invalid JSON"),
    ([{"id": 1, "references": []}], [{"id": 1, "caption": "a"}], "refs.jsonl:1: \"references\" must be a non-empty"),
    ([{"id": 1, "references": ["a", " "]}], [{"id": 1, "caption": "a"}], "refs.jsonl:1:"),
    ([{"id": 1, "references": ["a"]}], [{"id": 1, "caption": "a"}, {"id": 1, "caption": "b"}],
     "preds.jsonl:2: id '1' occurs twice"),
    ([{"id": 1, "references": ["a"]}, {"id": 2, "references": ["b"]}], [{"id": 1, "caption": "a"}],
     "1 id(s) of "),
    ([{"id": 1, "references": ["a"]}], [{"id": 1, "caption": "a"}, {"id": 9, "caption": "b"}], "are not in"),
    ([{"id": 1, "references": ["a"]}], [{"id": 1, "caption": 5}], "preds.jsonl:1: \"caption\" must be a string"),
    ([["not", "an", "object"]], [{"id": 1, "caption": "a"}], "refs.jsonl:1: expected an object"),
    ([], [{"id": 1, "caption": "a"}], "no references"),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, capsys, refs, preds, message):
    r, p = write(tmp_path / "refs.jsonl", refs), write(tmp_path / "preds.jsonl", preds)
    code, out, err = run(capsys, "--references", str(r), "--predictions", str(p), "--json", "--no-meteor")
    assert code == 2 and out == "" and message in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_the_evaluate_module_asks_for_meteor_unless_loaded_as_no_meteor(monkeypatch, tmp_path):
    import evaluate

    import fashioncap
    from fashioncap import scoring

    asked = []
    monkeypatch.setattr(scoring, "score",
                        lambda refs, preds, meteor=True, attributes=None: asked.append(meteor) or {"bleu_1": 1.0})
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    for config, expected in ((None, True), ("no-meteor", False)):
        metric = evaluate.load(fashioncap.EVALUATE_METRIC, config) if config else evaluate.load(fashioncap.EVALUATE_METRIC)
        metric.compute(predictions=["a"], references=[["a"]])
        assert asked[-1] is expected
