"""Fashion attribute precision and recall: is the colour right? BLEU and CIDEr-D cannot say.

Attributes (colours, patterns, materials, garment types, details such as neckline or closure) are found
in a caption by matching the vocabulary's phrases on COCO tokens, longest first ("navy blue" before
"blue"; synonyms such as grey/gray name one attribute). Per attribute type, a caption's attributes are
compared with the union of its references' as sets: precision = correct / stated by the caption,
recall = correct / stated by the references, micro-averaged over the scored items. Which part an
attribute belongs to is not checked ("red strap, blue dial" and "blue strap, red dial" agree).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from .ptb import coco_tokens
from .runtime import FashioncapError


class VocabularyError(FashioncapError):
    """The attribute vocabulary file is missing or malformed."""


@dataclass(frozen=True)
class Vocabulary:
    """Phrase (as a tuple of tokens) -> (type, attribute)."""

    phrases: dict[tuple[str, ...], tuple[str, str]]
    types: tuple[str, ...]

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise VocabularyError(f"attribute vocabulary {path}: {error}") from None
        if not isinstance(raw, dict) or not raw:
            raise VocabularyError(f"attribute vocabulary {path}: expected a mapping of types to attributes")
        phrases: dict[tuple[str, ...], tuple[str, str]] = {}
        for kind, attributes in raw.items():
            if not isinstance(attributes, dict):
                raise VocabularyError(f"attribute vocabulary {path}: {kind}: expected a mapping of attributes")
            for name, synonyms in attributes.items():
                if not isinstance(synonyms, list) or not all(isinstance(s, str) and s.strip() for s in synonyms):
                    raise VocabularyError(f"attribute vocabulary {path}: {kind}.{name}: expected a list of phrases")
                for phrase in synonyms:
                    key = tuple(coco_tokens(phrase).split())
                    if key in phrases and phrases[key] != (kind, name):
                        raise VocabularyError(f"attribute vocabulary {path}: {phrase!r} means both "
                                              f"{'.'.join(phrases[key])} and {kind}.{name}")
                    phrases[key] = (str(kind), str(name))
        return cls(phrases, tuple(str(k) for k in raw))

    @property
    def longest(self) -> int:
        return max(len(p) for p in self.phrases)

    def extract(self, caption: str) -> set[tuple[str, str]]:
        """The (type, attribute) pairs a caption states."""
        tokens, found, i = coco_tokens(caption).split(), set(), 0
        while i < len(tokens):
            for n in range(min(self.longest, len(tokens) - i), 0, -1):
                hit = self.phrases.get(tuple(tokens[i : i + n]))
                if hit:
                    found.add(hit)
                    i += n
                    break
            else:
                i += 1
        return found

    def covered(self, caption: str) -> list[str]:
        """The caption's tokens that no phrase covers (what the vocabulary misses)."""
        tokens, missed, i = coco_tokens(caption).split(), [], 0
        while i < len(tokens):
            for n in range(min(self.longest, len(tokens) - i), 0, -1):
                if tuple(tokens[i : i + n]) in self.phrases:
                    i += n
                    break
            else:
                missed.append(tokens[i])
                i += 1
        return missed


def attribute_scores(vocabulary: Vocabulary, references: Sequence[Sequence[str]],
                     captions: Sequence[str]) -> dict[str, dict]:
    """Per type: precision, recall, f1 (None where nothing was stated), and the counts behind them."""
    counts = {kind: Counter() for kind in vocabulary.types}
    for refs, caption in zip(references, captions):
        truth = set().union(*(vocabulary.extract(r) for r in refs))
        said = vocabulary.extract(caption)
        for kind in vocabulary.types:
            t = {a for k, a in truth if k == kind}
            s = {a for k, a in said if k == kind}
            counts[kind].update(correct=len(t & s), stated=len(s), expected=len(t))
    out = {}
    for kind, c in counts.items():
        p = c["correct"] / c["stated"] if c["stated"] else None
        r = c["correct"] / c["expected"] if c["expected"] else None
        f1 = 2 * p * r / (p + r) if p and r else (0.0 if p is not None and r is not None else None)
        out[kind] = {"precision": p, "recall": r, "f1": f1, "correct": c["correct"], "stated": c["stated"],
                     "expected": c["expected"]}
    return out


def confusions(vocabulary: Vocabulary, references: Sequence[Sequence[str]], captions: Sequence[str],
               top: int = 10) -> list[dict]:
    """The most frequent substitutions: an attribute of the references missing from the caption while the
    caption states another of the same type instead (reference "navy" -> caption "black")."""
    pairs: Counter = Counter()
    for refs, caption in zip(references, captions):
        truth = set().union(*(vocabulary.extract(r) for r in refs))
        said = vocabulary.extract(caption)
        for kind, expected in truth - said:
            for other_kind, instead in said - truth:
                if other_kind == kind:
                    pairs[(kind, expected, instead)] += 1
    # ties by name: set order changes with each process's string hashing, and eval.json must not
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [{"type": k, "reference": e, "caption": i, "count": n} for (k, e, i), n in ranked]


def flat(scores: dict[str, dict], suffix: str = "") -> dict[str, float]:
    """attr/<type>/<precision|recall|f1><suffix> for MLflow and `fashioncap score` (types with a value)."""
    return {f"attr/{kind}/{name}{suffix}": value for kind, s in scores.items()
            for name, value in s.items() if name in ("precision", "recall", "f1") and value is not None}
