"""Caption text: training targets keep what product copy needs, scoring compares words, people read tidy text."""

import pytest

from fashioncap.captions import clean_caption, display_caption
from fashioncap.metrics import caption_scores


def test_training_targets_keep_numbers_units_and_sentence_punctuation():
    raw = "Fitted top in soft jersey,  100% cotton.\r\nHeel 4.5\u00a0cm. Size 21x27x6 cm (approx.)"
    assert clean_caption(raw) == "Fitted top in soft jersey, 100% cotton. Heel 4.5 cm. Size 21x27x6 cm (approx.)"


@pytest.mark.parametrize("separator", ["\r", "\n", "\u2028", "\u2029", "\x85", "\t", "\x00"])
def test_a_line_break_or_control_character_never_stays_inside_a_caption(separator):
    assert clean_caption(f"black dress{separator}with a tie belt") == "black dress with a tie belt"


@pytest.mark.parametrize(("decoded", "shown"), [
    ("heel 4. 5 cm. fitted top with a v - neck, long sleeves and 100 % cotton .",
     "Heel 4.5 cm. Fitted top with a v-neck, long sleeves and 100% cotton."),
    ("it ' s a t - shirt ( relaxed fit ) . sizes xs - xl", "It's a t-shirt (relaxed fit). Sizes xs-xl"),
    ("trousers with 1, 000 pleats and a 3 / 4 length", "Trousers with 1,000 pleats and a 3/4 length"),
    ("a watch with silver mesh bracelet", "A watch with silver mesh bracelet"),
])
def test_captions_shown_to_people_are_tidy(decoded, shown):
    assert display_caption(decoded) == shown


def test_scoring_ignores_case_and_punctuation_but_not_words_or_numbers():
    reference = ["Heel 4.5 cm. Black ankle boots."]
    assert caption_scores([reference], ["heel 4.5 cm black ankle boots"])["bleu_4"] == pytest.approx(1.0)
    assert caption_scores([reference], ["heel 4 5 cm black ankle boots"])["bleu_4"] < 0.7  # "4.5" is one token
    same = caption_scores([reference, ["White trainers."]], ["HEEL 4.5 cm, black ankle boots!", "white trainers"])
    other = caption_scores([reference, ["White trainers."]], ["heel 6 cm black ankle boots", "white trainers"])
    assert same["bleu_1"] == pytest.approx(1.0) and other["bleu_1"] < same["bleu_1"]
