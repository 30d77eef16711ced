"""Our BLEU / CIDEr-D / ROUGE-L must equal pycocoevalcap's scorers on the same tokens (captions that
COCO's tokenisation leaves as they are; tests/stage/test_coco_parity.py checks the whole pipeline)."""

import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from fashioncap.metrics import caption_scores, per_item_cider_d
from fashioncap.synthetic import catalogue


def reference_scores(refs, hyps):
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_items = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {**{f"bleu_{k + 1}": b for k, b in enumerate(bleu)}, "cider_d": cider, "rouge_l": rouge}, cider_items


def noisy_set(seed: int, n: int, max_refs: int):
    rng = random.Random(seed)
    captions = [p.caption for p in catalogue(seed, n, 32)]
    refs = [[c] + [rng.choice(captions) for _ in range(rng.randrange(max_refs))] for c in captions]
    hyps = []
    for c in captions:
        words = [w for w in rng.choice([c, rng.choice(captions)]).split() if rng.random() < 0.85]
        if rng.random() < 0.2:
            words += rng.sample(c.split(), 2)
        hyps.append(" ".join(words) or "a")
    return refs, hyps


@pytest.mark.parametrize("seed,max_refs", [(0, 1), (1, 5), (2, 3)])
def test_scores_equal_pycocoevalcap(seed, max_refs):
    refs, hyps = noisy_set(seed, 200, max_refs)
    ours = caption_scores(refs, hyps)
    theirs, cider_items = reference_scores(refs, hyps)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name
    assert per_item_cider_d(refs, hyps) == pytest.approx(list(cider_items), abs=1e-9)


def test_short_and_empty_hypotheses_match_reference():
    refs = [["a red watch with black strap"], ["a blue handbag"], ["a pair of round sunglasses"], ["a t-shirt"]]
    hyps = ["a", "a blue handbag", "", "a t-shirt with a pocket"]
    ours = caption_scores(refs, hyps)
    theirs, _ = reference_scores(refs, hyps)
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name


def test_perfect_captions_score_top_marks():
    refs, _ = noisy_set(3, 60, 1)
    scores = caption_scores(refs, [r[0] for r in refs])
    assert scores["bleu_4"] == pytest.approx(1.0)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["cider_d"] == pytest.approx(10.0)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 reference lists but 1"):
        caption_scores([["a"], ["b"]], ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores([[]], ["a"])


def test_a_vocabulary_too_large_for_integer_ngram_codes_scores_the_same():
    # 60,000 distinct words: 4-gram codes would overflow int64, so n-grams are told apart as rows
    rng = random.Random(5)
    words = [f"w{i}" for i in range(60_000)]
    refs = [[" ".join(rng.sample(words, 12)) for _ in range(2)] for _ in range(2500)]
    hyps = [" ".join(r[0].split()[:8] + rng.sample(words, 3)) for r in refs]
    ours = caption_scores(refs, hyps)
    theirs, _ = reference_scores(refs, hyps)
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name


def test_rouge_l_scores_a_whole_number_and_its_fraction_as_one_word_as_pycocoevalcap_does():
    """COCO's tokenizer joins "32 1/2" with a no-break space: pycocoevalcap's ROUGE-L splits on plain spaces
    (one word, which differs from "32 3/4"), its BLEU on any whitespace (two words, "32" in common)."""
    refs, hyps = [["Trousers in size 32 1/2."]], ["trousers in size 32 3/4"]
    official = ({0: ["trousers in size 32\u00a01/2"]}, {0: ["trousers in size 32\u00a03/4"]})
    ours = caption_scores(refs, hyps)
    assert ours["rouge_l"] == pytest.approx(Rouge().compute_score(*official)[0], abs=1e-12)
    assert ours["bleu_1"] == pytest.approx(Bleu(4).compute_score(*official, verbose=0)[0][0], abs=1e-12)
    assert ours["rouge_l"] == pytest.approx(0.75) and ours["bleu_1"] == pytest.approx(0.8)
