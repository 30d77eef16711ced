"""Caption metrics with COCO-caption semantics: BLEU-1..4, CIDEr-D and ROUGE-L.

The formulas follow `pycocoevalcap` (the scorer BLIP and LAVIS report with) to the last
detail that changes a number: corpus BLEU with the closest reference length, CIDEr-D with
clipped tf-idf, a Gaussian length penalty (sigma 6) and IDF taken from the scored set, and
ROUGE-L's F-measure with beta 1.2. Tests hold the two equal to 1e-9. BLEU and CIDEr-D are
vectorised: every sentence becomes a row of sparse n-gram count matrices once, and the scores
are sparse-matrix arithmetic over the whole set (benchmarks/ measures the speed-up).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .ptb import coco_corpus
from .runtime import FashioncapError


@dataclass(frozen=True)
class _Corpus:
    """Every sentence of a scoring call as sparse n-gram count matrices (one per order, a row per
    sentence), built once with numpy and shared by BLEU and CIDEr-D."""

    counts: tuple  # n scipy CSR matrices: sentences x distinct n-grams of that order
    lengths: np.ndarray  # words per sentence

    @classmethod
    def of(cls, sentences: Sequence[str], n: int) -> "_Corpus":
        from scipy import sparse

        vocab: dict[str, int] = {}
        tokens = [[vocab.setdefault(w, len(vocab)) for w in s.split()] for s in sentences]
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        words = np.fromiter((w for t in tokens for w in t), dtype=np.int64, count=int(lengths.sum()))
        owner = np.repeat(np.arange(len(tokens)), lengths)
        ends = np.repeat(np.cumsum(lengths), lengths)  # one past the last word of each word's sentence
        counts, base = [], max(len(vocab), 1)
        for k in range(1, n + 1):
            start = np.flatnonzero(np.arange(len(words)) + k <= ends)
            if base ** k < 2**62:  # an n-gram as one integer in base len(vocab): a fast 1-D unique
                code = np.zeros(len(start), dtype=np.int64)
                for j in range(k):
                    code = code * base + words[start + j]
                ids = np.unique(code, return_inverse=True)[1]
            else:  # a huge vocabulary: unique rows of word ids instead
                grams = np.stack([words[start + j] for j in range(k)], axis=1)
                ids = np.unique(grams, axis=0, return_inverse=True)[1].reshape(-1) if len(start) else start
            counts.append(sparse.csr_matrix((np.ones(len(start)), (owner[start], ids)),
                                            shape=(len(tokens), int(ids.max(initial=-1)) + 1)))
        return cls(tuple(counts), lengths)


def tokenised(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """References and hypotheses as the scorer compares them (COCO's PTB tokens), checked to pair up."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference lists but {len(hypotheses)} hypotheses")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    # each side as one run of COCO's tokenizer: the references of all items in order, then the hypotheses
    flat = iter(coco_corpus([r for refs in references for r in refs]))
    return [[next(flat) for _ in refs] for refs in references], coco_corpus(hypotheses)


def _split(references: Sequence[Sequence[str]], hypotheses: Sequence[str], n: int):
    """The corpus of tokenised hypotheses and references, the hypotheses' rows and, per reference slot j,
    the row of each item's j-th reference (-1 where an item has fewer references)."""
    references, hypotheses = tokenised(references, hypotheses)
    sentences = list(hypotheses)
    slots = np.full((len(hypotheses), max(len(r) for r in references)), -1, dtype=np.int64)
    for i, refs in enumerate(references):
        slots[i, : len(refs)] = np.arange(len(sentences), len(sentences) + len(refs))
        sentences.extend(refs)
    return _Corpus.of(sentences, n), np.arange(len(hypotheses)), slots


def _rows(matrix, rows: np.ndarray):
    """The given rows of a CSR matrix, all zero where the row index is -1."""
    from scipy import sparse

    return sparse.diags((rows >= 0).astype(float)) @ matrix[np.maximum(rows, 0)]


def _bleu(corpus: _Corpus, hyp: np.ndarray, slots: np.ndarray, n: int) -> list[float]:
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's guards against empty guesses
    h_len = corpus.lengths[hyp]
    r_len = np.where(slots >= 0, corpus.lengths[np.maximum(slots, 0)], 1 << 20)
    # the closest reference length, the shorter one on a tie
    closest = np.argmin(np.abs(r_len - h_len[:, None]) * (1 << 21) + r_len, axis=1)
    ref_len = float(r_len[np.arange(len(hyp)), closest].sum())
    scores, product = [], 1.0
    for k in range(n):
        counts = corpus.counts[k]
        clip = _rows(counts, slots[:, 0])
        for j in range(1, slots.shape[1]):
            clip = clip.maximum(_rows(counts, slots[:, j]))
        correct = float(counts[hyp].minimum(clip).sum())
        guess = float(np.maximum(0, h_len - k).sum())
        product *= (correct + tiny) / (guess + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (float(h_len.sum()) + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _cider_d(corpus: _Corpus, hyp: np.ndarray, slots: np.ndarray, n: int, sigma: float) -> np.ndarray:
    from scipy import sparse

    has_ref = slots >= 0
    # bigram counts as the length, as pycocoevalcap measures it (both sides shift by one word)
    length = np.asarray(corpus.counts[1].sum(axis=1)).ravel()
    h_len, total = length[hyp], np.zeros(len(hyp))
    for k in range(n):
        counts = corpus.counts[k]
        refs = [_rows(counts, slots[:, j]) for j in range(slots.shape[1])]
        union = refs[0]
        for r in refs[1:]:
            union = union.maximum(r)
        df = np.asarray((union > 0).sum(axis=0)).ravel()  # items whose references hold the n-gram
        idf = sparse.diags(math.log(float(len(hyp))) - np.log(np.maximum(1.0, df)))
        hv = counts[hyp] @ idf
        h_norm = np.sqrt(np.asarray(hv.multiply(hv).sum(axis=1)).ravel())
        for j, r in enumerate(refs):
            rv = r @ idf
            r_norm = np.sqrt(np.asarray(rv.multiply(rv).sum(axis=1)).ravel())
            val = np.asarray(hv.minimum(rv).multiply(rv).sum(axis=1)).ravel()
            both = (h_norm != 0) & (r_norm != 0)
            val[both] /= h_norm[both] * r_norm[both]
            penalty = np.exp(-((h_len - length[np.maximum(slots[:, j], 0)]) ** 2) / (2 * sigma**2))
            total += np.where(has_ref[:, j], val * penalty, 0.0)
    return total / n / has_ref.sum(axis=1) * 10.0


def _lcs(a: Sequence[str], masks: dict[str, int], length: int) -> int:
    """Length of the longest common subsequence of `a` and a sequence of `length` words whose positions
    `masks` holds as bits, bit-parallel (Hyyro 2004): one big-integer step per word of `a` instead of a
    row of the dynamic programme."""
    v = ones = (1 << length) - 1
    for word in a:
        u = v & masks.get(word, 0)
        v = ((v + u) | (v - u)) & ones
    return length - v.bit_count()


def _positions(words: Sequence[str]) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, word in enumerate(words):
        masks[word] = masks.get(word, 0) | 1 << i
    return masks


def _rouge_l(references: Sequence[Sequence[str]], hypotheses: Sequence[str], beta: float = 1.2) -> list[float]:
    scores = []
    for rs, h in zip(references, hypotheses):
        cand = h.split(" ")
        masks = _positions(cand)
        lcs = [(_lcs(r.split(" "), masks, len(cand)), len(r.split(" "))) for r in rs]
        prec = max(m / len(cand) for m, _ in lcs)
        rec = max(m / rl for m, rl in lcs)
        scores.append((1 + beta**2) * prec * rec / (rec + beta**2 * prec) if prec and rec else 0.0)
    return scores


class MeteorError(FashioncapError):
    """METEOR cannot run here (no Java)."""


NO_JAVA = ("METEOR is computed as the COCO evaluation computes it, by the METEOR 1.5 jar that pycocoevalcap "
           "ships, which needs Java, and there is no `java` on PATH. Install Java (Debian/Ubuntu: apt-get install "
           "default-jre-headless) or turn METEOR off for this run: -S evaluate.meteor=false")


class Meteor:
    """METEOR 1.5 as the COCO evaluation runs it (pycocoevalcap's jar under Java, `-l en -norm`) on COCO's
    PTB tokens. One Java process per instance, reused for every call: it takes ~5 s to start (the
    paraphrase table loads). Use as a context manager, or close()."""

    def __init__(self):
        if shutil.which("java") is None:
            raise MeteorError(NO_JAVA)
        from pycocoevalcap.meteor.meteor import Meteor as CocoMeteor

        self._scorer = CocoMeteor()

    def __call__(self, references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> float:
        refs, hyps = tokenised(references, hypotheses)
        score, _ = self._scorer.compute_score({i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
        return float(score)

    def close(self) -> None:
        process = self._scorer.meteor_p
        if process.poll() is None:
            process.stdin.close()
            process.kill()
            process.wait()

    def __enter__(self) -> "Meteor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def caption_scores(references: Sequence[Sequence[str]], hypotheses: Sequence[str],
                   meteor: Meteor | None = None) -> dict[str, float]:
    """Scores hypotheses against their references: bleu_1..4, cider_d, rouge_l and, given a Meteor, meteor
    (all on COCO's PTB tokens)."""
    if not hypotheses:
        raise ValueError("nothing to score")
    result = bleu_cider_d(references, hypotheses)
    rouge = _rouge_l(*tokenised(references, hypotheses))
    result["rouge_l"] = sum(rouge) / len(rouge)
    if meteor is not None:
        result["meteor"] = meteor(references, hypotheses)
    return result


def bleu_cider_d(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 and mean CIDEr-D of hypotheses against their references."""
    corpus, hyp, slots = _split(references, hypotheses, 4)
    result = {f"bleu_{k + 1}": v for k, v in enumerate(_bleu(corpus, hyp, slots, 4))}
    result["cider_d"] = float(_cider_d(corpus, hyp, slots, 4, 6.0).mean())
    return result


def per_item_cider_d(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> list[float]:
    """CIDEr-D of each hypothesis, with IDF from the whole set (so a lone item scores 0)."""
    corpus, hyp, slots = _split(references, hypotheses, 4)
    return [float(v) for v in _cider_d(corpus, hyp, slots, 4, 6.0)]
