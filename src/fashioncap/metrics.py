"""Caption metrics with COCO-caption semantics: BLEU-1..4, CIDEr-D and ROUGE-L.

The formulas follow `pycocoevalcap` (the scorer BLIP and LAVIS report with) to the last
detail that changes a number: corpus BLEU with the closest reference length, CIDEr-D with
clipped tf-idf, a Gaussian length penalty (sigma 6) and IDF taken from the scored set, and
ROUGE-L's F-measure with beta 1.2. Tests hold the two equal to 1e-6. Each sentence is
turned into n-gram counts once and shared by every metric.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_SPACED_HYPHEN = re.compile(r"(?<=\w)\s+-\s+(?=\w)")  # "t - shirt", as word-piece decoders write it
_PUNCT = re.compile(r"[^\w\s-]|(?<!\w)-|-(?!\w)")
_SPACE = re.compile(r"\s+")

Ngrams = tuple[Counter, ...]


def normalize_caption(text: str) -> str:
    """Lower-cases, folds unicode, drops punctuation (keeping in-word hyphens) and collapses spaces."""
    text = _SPACED_HYPHEN.sub("-", unicodedata.normalize("NFKC", text).lower())
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def ngram_counts(words: Sequence[str], n: int = 4) -> Ngrams:
    """Counts the 1..n-grams of a tokenised sentence, one Counter per order."""
    return tuple(Counter(tuple(words[i : i + k]) for i in range(len(words) - k + 1)) for k in range(1, n + 1))


@dataclass(frozen=True)
class _Sentence:
    length: int
    grams: Ngrams

    @classmethod
    def of(cls, text: str, n: int) -> "_Sentence":
        words = text.split()
        return cls(len(words), ngram_counts(words, n))


def _prepare(references: Sequence[Sequence[str]], hypotheses: Sequence[str], n: int):
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference lists but {len(hypotheses)} hypotheses")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    refs = [[_Sentence.of(r, n) for r in rs] for rs in references]
    hyps = [_Sentence.of(h, n) for h in hypotheses]
    return refs, hyps


def _bleu(refs: list[list[_Sentence]], hyps: list[_Sentence], n: int) -> list[float]:
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's guards against empty guesses
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for rs, h in zip(refs, hyps):
        test_len += h.length
        ref_len += min((abs(r.length - h.length), r.length) for r in rs)[1]
        for k in range(n):
            guess[k] += max(0, h.length - k)
            clip: Counter = Counter()
            for r in rs:
                clip |= r.grams[k]
            correct[k] += sum(min(c, clip[g]) for g, c in h.grams[k].items())
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _cider_d(refs: list[list[_Sentence]], hyps: list[_Sentence], n: int, sigma: float) -> list[float]:
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for order in r.grams for g in order})
    log_items = math.log(float(len(refs)))

    def vector(s: _Sentence):
        vec = [{g: tf * (log_items - math.log(max(1.0, df[g]))) for g, tf in order.items()} for order in s.grams]
        norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
        # pycocoevalcap measures length in bigrams, which shifts both sides by one word
        return vec, norms, sum(s.grams[1].values()) if n > 1 else 0

    scores = []
    for rs, h in zip(refs, hyps):
        hv, hn, hl = vector(h)
        total = 0.0
        for r in rs:
            rv, rn, rl = vector(r)
            penalty = math.exp(-((hl - rl) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, rv[k].get(g, 0.0)) * rv[k].get(g, 0.0) for g, w in hv[k].items())
                if hn[k] != 0 and rn[k] != 0:
                    val /= hn[k] * rn[k]
                total += val * penalty
        scores.append(total / n / len(rs) * 10.0)
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _rouge_l(references: Sequence[Sequence[str]], hypotheses: Sequence[str], beta: float = 1.2) -> list[float]:
    scores = []
    for rs, h in zip(references, hypotheses):
        cand = h.split(" ")
        lcs = [(_lcs(r.split(" "), cand), len(r.split(" "))) for r in rs]
        prec = max(m / len(cand) for m, _ in lcs)
        rec = max(m / rl for m, rl in lcs)
        scores.append((1 + beta**2) * prec * rec / (rec + beta**2 * prec) if prec and rec else 0.0)
    return scores


def caption_scores(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
    """Scores normalised hypotheses against their references: bleu_1..4, cider_d, rouge_l."""
    if not hypotheses:
        raise ValueError("nothing to score")
    refs, hyps = _prepare(references, hypotheses, 4)
    result = {f"bleu_{k + 1}": v for k, v in enumerate(_bleu(refs, hyps, 4))}
    cider = _cider_d(refs, hyps, 4, 6.0)
    result["cider_d"] = sum(cider) / len(cider)
    rouge = _rouge_l(references, hypotheses)
    result["rouge_l"] = sum(rouge) / len(rouge)
    return result


def per_item_cider_d(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> list[float]:
    """CIDEr-D of each hypothesis, with IDF from the whole set (so a lone item scores 0)."""
    refs, hyps = _prepare(references, hypotheses, 4)
    return _cider_d(refs, hyps, 4, 6.0)
