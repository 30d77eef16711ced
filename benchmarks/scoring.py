"""Metrics: COCO tokenisation + BLEU-1..4, CIDEr-D and ROUGE-L of 5,000 captions with 5 references each,
product-copy style (capitals, full stops), this project's scorer (PTB tokens in Python, vectorised
BLEU/CIDEr-D, bit-parallel ROUGE-L) against the official pipeline: Stanford's PTBTokenizer (Java) and
pycocoevalcap (what COCO, BLIP and LAVIS report with). The values must agree to 1e-4."""

from __future__ import annotations

import random

from .common import Result, median_seconds, products


def caption_set(n: int, refs_per_item: int, seed: int = 3) -> tuple[list[list[str]], list[str]]:
    """References: the item's caption and others of its category; hypotheses: a near miss of the caption."""
    rng = random.Random(seed)
    catalogue = products(n, 32, seed)
    by_category: dict[str, list[str]] = {}
    for p in catalogue:
        by_category.setdefault(p.category, []).append(p.caption)
    refs, hyps = [], []
    for p in catalogue:
        refs.append([f"{c[0].upper()}{c[1:]}." for c in [p.caption] + rng.sample(by_category[p.category],
                                                                                    refs_per_item - 1)])
        words = [w for w in rng.choice(by_category[p.category]).split() if rng.random() < 0.9]
        hyps.append((" ".join(words) or "a").capitalize())
    return refs, hyps


def official_scores(refs: list[list[str]], hyps: list[str]) -> dict[str, float]:
    import contextlib
    import io

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()):
        gts = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
        res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {**{f"bleu_{k + 1}": b for k, b in enumerate(bleu)}, "cider_d": cider, "rouge_l": rouge}


def ours(refs: list[list[str]], hyps: list[str]) -> dict[str, float]:
    from fashioncap.metrics import caption_scores
    from fashioncap.ptb import coco_tokens

    coco_tokens.cache_clear()  # every call tokenises afresh, as the official pipeline does
    return caption_scores(refs, hyps)


def run(level: str) -> list[Result]:
    import time

    n = 500 if level == "smoke" else 5000
    refs, hyps = caption_set(n, 5)
    started = time.perf_counter()
    theirs = official_scores(refs, hyps)
    first = time.perf_counter() - started
    mine = ours(refs, hyps)
    worst = max(abs(mine[k] - theirs[k]) for k in theirs)
    if worst > 1e-4:
        raise AssertionError(f"scores differ from the official pipeline by {worst}: {mine} vs {theirs}")
    repeats = {"full": 7, "quick": 3, "smoke": 1}[level]
    ours_s = median_seconds(lambda: ours(refs, hyps), repeats)
    # the official pipeline takes seconds a call: below the full level its first (checked) call is its only timing
    theirs_s = first if level != "full" else median_seconds(lambda: official_scores(refs, hyps), repeats, warmup=0)
    return [Result("metrics", f"tokens + BLEU-1..4, CIDEr-D, ROUGE-L, {n:,} images x 5 refs", "s", ours_s, theirs_s,
                   "PTBTokenizer (Java) + pycocoevalcap", target=5.0, higher_is_better=False,
                   note=f"max |difference| {worst:.1e}")]
