"""Metrics: BLEU-1..4 + CIDEr-D of 5,000 captions with 5 references each, this project's vectorised
scorer against pycocoevalcap (what BLIP and LAVIS report with). The values must be identical."""

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
        refs.append([p.caption] + rng.sample(by_category[p.category], refs_per_item - 1))
        words = [w for w in rng.choice(by_category[p.category]).split() if rng.random() < 0.9]
        hyps.append(" ".join(words) or "a")
    return refs, hyps


def pycocoevalcap_scores(refs: list[list[str]], hyps: list[str]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu_{k + 1}": b for k, b in enumerate(bleu)}, "cider_d": cider}


def run(level: str) -> list[Result]:
    from fashioncap.metrics import bleu_cider_d

    import time

    n = 500 if level == "smoke" else 5000
    refs, hyps = caption_set(n, 5)
    started = time.perf_counter()
    theirs = pycocoevalcap_scores(refs, hyps)
    first = time.perf_counter() - started
    ours = bleu_cider_d(refs, hyps)
    worst = max(abs(ours[k] - theirs[k]) for k in theirs)
    if worst > 1e-9:
        raise AssertionError(f"scores differ from pycocoevalcap by {worst}: {ours} vs {theirs}")
    repeats = {"full": 7, "quick": 3, "smoke": 1}[level]
    ours_s = median_seconds(lambda: bleu_cider_d(refs, hyps), repeats)
    # pycocoevalcap takes seconds a call: below the full level its first (checked) call is its only timing
    theirs_s = first if level != "full" else median_seconds(lambda: pycocoevalcap_scores(refs, hyps), repeats, warmup=0)
    return [Result("metrics", f"BLEU-1..4 + CIDEr-D, {n:,} images x 5 refs", "s", ours_s, theirs_s, "pycocoevalcap",
                   target=5.0, higher_is_better=False, note=f"max |difference| {worst:.1e}")]
