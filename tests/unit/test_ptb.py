"""COCO's PTB tokens without Java: each rule of fashioncap.ptb, with the output of the real Stanford
PTBTokenizer 3.4.1 + pycocoevalcap's punctuation removal as the expected value (tests/stage/
test_coco_parity.py runs the Java tokenizer itself on whole corpora)."""

import pytest
from hypothesis import given, settings, strategies as st

from fashioncap.ptb import coco_corpus, coco_tokens


@pytest.mark.parametrize(("caption", "official"), [
    # contractions, as the Penn Treebank splits them
    ("The bag isn't lined and can't be machine-washed.", "the bag is n't lined and ca n't be machine-washed"),
    ("You cannot return worn items.", "you can not return worn items"),
    ("Jenny's favourite jeans", "jenny 's favourite jeans"),
    ("don't won't gonna wanna", "do n't wo n't gon na wan na"),
    ("the 1990's fashion", "the 1990 's fashion"),
    # numbers and symbols stay (fashion copy is full of them)
    ("Shorts in twill: 98% cotton, 2% elastane.", "shorts in twill 98 % cotton 2 % elastane"),
    ("Price $29.99 (incl. VAT), 1,000 pieces only!", "price $ 29.99 -lrb- incl vat -rrb- 1,000 pieces only"),
    ("price £20 or €30", "price # 20 or $ 30"),
    ("Dungarees with straps & buttons", "dungarees with straps & buttons"),
    ("H&M top", "h&m top"),
    ("at&t phone", "at & t phone"),
    # capitals joined by "&" are one token only where a token starts, and end one
    ("aT&T pHONe cAsE.", "at & t phone case"),
    ("AT&Ts and M&Ms", "at&t s and m&m s"),
    ("x-AT&T, R&D/Q&A, A&B&c", "x-at & t r&d / q&a a&b & c"),
    ("AT&T-style (AT&T)", "at&t style -lrb- at&t -rrb-"),
    # a hyphen, period or underscore starting or ending a word is split off; before a digit it stays
    ("a -y .com _5 -5 .5 y- z_", "a y com _ 5 -5 .5 y z _"),
    ("Shoes with Velcro® fastenings, 20° wash", "shoes with velcro ® fastenings 20 ° wash"),
    ("~5 cm", "~ 5 cm"),
    # slashes: no escaping, at most three words joined
    ("Black/white striped top with 3/4 sleeves", "black/white striped top with 3/4 sleeves"),
    ("Size: XS/S/M/L/XL.", "size xs/s/m / l/xl"),
    ("Swimsuit w/ lined cups", "swimsuit w / lined cups"),
    ("4.8/5 stars", "4.8 / 5 stars"),
    # decimals glued to units are split, integers are not
    ("Hat with a 7.5cm brim", "hat with a 7.5 cm brim"),
    ("A dress that's 110cm long.", "a dress that 's 110cm long"),
    ("Shoe size 7½.", "shoe size 7 1/2"),
    # periods: abbreviations keep theirs
    ("approx. 5 cm long", "approx 5 cm long"),
    ("a dress etc.", "a dress etc."),
    ("Mr. Smith, Dr. Martens, no. 5, ca. 3 cm", "mr. smith dr. martens no. 5 ca. 3 cm"),
    ("made in the U.S.A. by hand", "made in the u.s.a. by hand"),
    ("Sizes S, M, L. Colours red, blue.", "sizes s m l. colours red blue"),
    # quotes, dashes, brackets, ellipses
    ('A "vintage" look', "a vintage look"),
    ("The brand's icon: 'the little black dress'.", "the brand 's icon the little black dress"),
    ("Rock 'n' roll T-shirt, '90s style", "rock 'n' roll t-shirt '90s style"),
    ("'tis the season", "'t is the season"),
    ("Dress - perfect for parties.", "dress perfect for parties"),
    ("Necklace — 45 cm long – adjustable; sizes 36–42", "necklace 45 cm long adjustable sizes 36 42"),
    ("top … and lace trims...", "top and lace trims"),
    ("Watch (grey bezel) [new] {case}", "watch -lrb- grey bezel -rrb- -lsb- new -rsb- -lcb- case -rcb-"),
    ("(a) [b] {c} <d>", "-lrb- a -rrb- -lsb- b -rsb- -lcb- c -rcb- <d>"),
    ("wow!!! great?!", "wow !!! great ?!"),
    ("Model is 189cm/6'2\" tall.", "model is 189cm/6 2 tall"),
    # no unicode folding: PTB keeps the ligature
    ("Coat with ﬁne stitching", "coat with ﬁne stitching"),
    ("Café-style apron", "café-style apron"),
    # line breaks are spaces
    ("a few people standing around a table\n", "a few people standing around a table"),
    # capitals and mixed case: possessives, contractions and quotes as in lower case (product copy)
    ("MIKE AND JENNY'S CAMPFIRE", "mike and jenny 's campfire"),
    ("MEN'S LEVI'S JEANS", "men 's levi 's jeans"),
    ("DON'T TUMBLE DRY, IT ISN'T WOOL", "do n't tumble dry it is n't wool"),
    ("IsN't It WE'RE yoU'Ll", "is n't it we 're you 'll"),
    ("ROCK 'N' ROLL TEE, '90S STYLE", "rock 'n' roll tee '90s style"),
    ("THE 'VINTAGE' LOOK", "the vintage look"),
    ("'TIS THE SEASON", "'t is the season"),
    # two periods: an ellipsis, or an abbreviation's period and one more
    ("a tennis racket..it is new", "a tennis racket it is new"),
    ("sizes S..XL", "sizes s. xl"),
    ("made in the U.S..", "made in the u.s."),
    ("3..4 cm", "3 .4 cm"),
    # a whole number and a fraction are one token, joined by a no-break space (Stanford's FRAC) or a hyphen;
    # a unicode fraction is spelled out as a token of its own
    ("Size 38 1/2 shoes", "size 38\u00a01/2 shoes"),
    ("a 2 1/2-inch heel, 38 1/2cm", "a 2\u00a01/2 inch heel 38\u00a01/2 cm"),
    ("a 2-1/2-inch heel", "a 2-1/2 inch heel"),
    ("sizes 8 1/2, 9 1/2W and (10 3/4)", "sizes 8\u00a01/2 9\u00a01/2 w and -lrb- 10\u00a03/4 -rrb-"),
    ("7½ inch, 7 ½ inch", "7 1/2 inch 7 1/2 inch"),
    ("12345 1/2, US6 1/2, 6.5 1/2, 38 1/23456", "12345 1/2 us6 1/2 6.5 1/2 38\u00a01/2345 6"),
])
def test_tokens_equal_the_official_coco_tokenisation(caption, official):
    assert coco_tokens(caption) == official


@pytest.mark.parametrize(("captions", "official"), [
    # one run of the Java tokenizer, a caption a line: a single letter's period is split off before a word that
    # starts a sentence, in the caption and across the line break
    (["wears size M.", "A dress"], ["wears size m", "a dress"]),
    (["size m.", "THE dress"], ["size m", "the dress"]),
    (["wears size M.", "a dress"], ["wears size m.", "a dress"]),
    (["wears size M.", "Dress in jersey"], ["wears size m.", "dress in jersey"]),
    (["wears size M.", "I like"], ["wears size m.", "i like"]),
    (["size L.", '"A" dress'], ["size l.", "a dress"]),
    (["a dress etc.", "The dress"], ["a dress etc.", "the dress"]),
    (["made in the U.S.", "The dress"], ["made in the u.s.", "the dress"]),
    (["size M. The dress", "size M. Dress"], ["size m the dress", "size m. dress"]),
    (["wears size M."], ["wears size m."]),
    # the word that starts the sentence must be whole: a clitic or a comma after it, and Java keeps the period
    (["wears size M.", "It's a hoodie"], ["wears size m.", "it 's a hoodie"]),
    (["wears size M.", "It'S a hoodie"], ["wears size m.", "it 's a hoodie"]),
    (["wears size M.", "It, a hoodie"], ["wears size m.", "it a hoodie"]),
    (["wears size M.", "It"], ["wears size m", "it"]),
    (["wears size M. It's a hoodie."], ["wears size m. it 's a hoodie"]),
    (["wears size M. It, a hoodie"], ["wears size m. it a hoodie"]),
])
def test_a_captions_tokens_follow_the_next_words_as_in_one_coco_run(captions, official):
    assert coco_corpus(captions) == official


def test_punctuation_only_captions_become_empty_or_keep_what_ptb_keeps():
    assert coco_tokens(".") == "" and coco_tokens("...") == "" and coco_tokens(" - ") == ""
    assert coco_tokens("!!!") == "!!!"


def test_word_piece_spacing_is_not_undone_by_the_tokeniser():
    """Decoder cleanup ("t - shirt" -> "t-shirt") belongs to generated captions (display_caption), not
    to the tokeniser that references go through."""
    assert coco_tokens("a red t - shirt") == "a red t shirt"
    from fashioncap.captions import display_caption

    assert coco_tokens(display_caption("a red t - shirt")) == "a red t-shirt"


PLAIN_WORDS = ["a", "Red", "dress", "cannot", "etc.", "Mr.", "no.", "ca.", "7.5cm", "U.S.", "1,000", "3.5", "-",
               "x.", "5", "t-shirt", "approx.", "Inc.", "gonna", "L."]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PLAIN_WORDS), min_size=1, max_size=9), st.sampled_from(["", ".", ",", " .", ","]))
def test_the_fast_path_for_plain_captions_equals_the_full_rules(words, end):
    from fashioncap import ptb

    caption = " ".join(words) + end
    assert ptb.ptb_tokens(caption) == ptb._slow_tokens(caption)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abXY019 ,.-", max_size=30))
def test_the_fast_path_equals_the_full_rules_on_any_plain_text(caption):
    from fashioncap import ptb

    assert ptb.ptb_tokens(caption) == ptb._slow_tokens(caption)


def test_plain_captions_take_the_fast_path(monkeypatch):
    from fashioncap import ptb

    monkeypatch.setattr(ptb, "_slow_tokens", lambda caption: pytest.fail(f"slow path for {caption!r}"))
    assert ptb.ptb_tokens("A red dress, 7.5cm long.") == ["a", "red", "dress", ",", "7.5", "cm", "long", "."]
