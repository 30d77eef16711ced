"""Scoring captions from outside the pipeline: files of references and predictions (`fashioncap score`)
and the Hugging Face `evaluate` module (fashioncap.EVALUATE_METRIC) both come here, so they give the
numbers the pipeline writes, by the same path (metrics.caption_scores)."""

from __future__ import annotations

import json
from pathlib import Path

from .attributes import Vocabulary, attribute_scores, flat
from .metrics import Meteor, caption_scores
from .runtime import FashioncapError, project_root

METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d", "rouge_l", "meteor")


class ScoreInputError(FashioncapError):
    """A references or predictions file that cannot be scored; the message names the file and line."""


def _lines(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ScoreInputError(f"{path}: cannot be read as UTF-8 text ({error})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ScoreInputError(f"{path}:{number}: invalid JSON ({error.msg})") from None
        if not isinstance(row, dict) or "id" not in row:
            raise ScoreInputError(f"{path}:{number}: expected an object with an \"id\"")
        yield number, row


def read_references(path: Path) -> dict[str, list[str]]:
    """`{"id": ..., "references": ["...", ...]}` per line: every id once, at least one non-empty reference."""
    out: dict[str, list[str]] = {}
    for number, row in _lines(path):
        refs = row.get("references")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise ScoreInputError(f"{path}:{number}: \"references\" must be a non-empty list of non-empty strings")
        key = str(row["id"])
        if key in out:
            raise ScoreInputError(f"{path}:{number}: id {key!r} occurs twice")
        out[key] = refs
    if not out:
        raise ScoreInputError(f"{path}: no references")
    return out


def read_predictions(path: Path) -> dict[str, str]:
    """`{"id": ..., "caption": "..."}` per line: every id once."""
    out: dict[str, str] = {}
    for number, row in _lines(path):
        caption = row.get("caption")
        if not isinstance(caption, str):
            raise ScoreInputError(f"{path}:{number}: \"caption\" must be a string")
        key = str(row["id"])
        if key in out:
            raise ScoreInputError(f"{path}:{number}: id {key!r} occurs twice")
        out[key] = caption
    return out


def paired(references: dict[str, list[str]], predictions: dict[str, str], refs_path: Path,
           preds_path: Path) -> tuple[list[list[str]], list[str]]:
    """References and predictions in the same order; every id must be in both files."""
    missing, extra = sorted(set(references) - set(predictions)), sorted(set(predictions) - set(references))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} id(s) of {refs_path} have no prediction in {preds_path} "
                         f"(first: {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} id(s) of {preds_path} are not in {refs_path} (first: {extra[0]!r})")
        raise ScoreInputError("; ".join(parts))
    keys = sorted(references)
    return [references[k] for k in keys], [predictions[k] for k in keys]


def default_vocabulary() -> Path | None:
    """The project's attribute vocabulary (conf/attributes.yaml), when run inside the project."""
    path = project_root() / "conf" / "attributes.yaml"
    return path if path.is_file() else None


def score(references: list[list[str]], predictions: list[str], meteor: bool = True,
          attributes: str | Path | None = None) -> dict[str, float]:
    """Every metric of the pipeline on these captions (METEOR starts Java for the call), and with an
    attribute vocabulary, attr/<type>/<precision|recall|f1> as the pipeline logs them."""
    if meteor:
        with Meteor() as scorer:
            scores = caption_scores(references, predictions, scorer)
    else:
        scores = caption_scores(references, predictions)
    if attributes is not None:
        scores.update(flat(attribute_scores(Vocabulary.load(attributes), references, predictions)))
    return scores


def score_files(references: Path, predictions: Path, meteor: bool = True,
                attributes: Path | None = None) -> dict[str, float]:
    refs, preds = paired(read_references(references), read_predictions(predictions), references, predictions)
    return score(refs, preds, meteor, attributes)


def table(scores: dict[str, float]) -> str:
    labels = {"bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "cider_d": "CIDEr-D",
              "rouge_l": "ROUGE-L", "meteor": "METEOR"}
    return "\n".join(f"{labels.get(k, k):<10}{v:.4f}" for k, v in scores.items())
