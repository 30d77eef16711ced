"""Caption text in two forms: the training target and what users read (the scoring tokens are COCO's:
`ptb.coco_tokens`).

- `clean_caption`: the text a model learns and a test set is scored against. Product copy needs its
  numbers, units and sentence breaks ("Heel 4.5 cm."), so only the encoding noise goes: unicode
  forms are folded, control characters and runs of white space become one space.
- `display_caption`: a decoded caption made tidy for people: the WordPiece decoder's spaces around
  punctuation removed ("4. 5 cm ." -> "4.5 cm.", "t - shirt" -> "t-shirt"), sentences capitalised. Every
  generated caption goes through it before it is shown, stored or scored; references never do.
"""

from __future__ import annotations

import re
import unicodedata

_SPACED_HYPHEN = re.compile(r"(?<=\w)\s+-\s+(?=\w)")  # "t - shirt", as word-piece decoders write it
_SPACE = re.compile(r"\s+")
# C0/C1 controls and the line/paragraph separators that split a caption across lines in other tools
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?%)\]}])")
_AFTER_OPEN = re.compile(r"([(\[{])\s+")
_SPLIT_NUMBER = re.compile(r"(?<=\d)(?:([.,])\s+|\s*(/)\s*)(?=\d)")  # "4. 5" -> "4.5", "1, 000" -> "1,000"
_APOSTROPHE = re.compile(r"(?<=\w)\s*'\s*(?=(?:s|t|re|ve|ll|d|m)\b)")  # "it ' s" -> "it's"
_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")


def clean_caption(text: str) -> str:
    """The caption as training target and reference: NFKC, one space between words, nothing else changed."""
    text = _CONTROL.sub(" ", unicodedata.normalize("NFKC", text))
    return _SPACE.sub(" ", text).strip()


def display_caption(text: str) -> str:
    """A decoded caption as people read it: no space before punctuation or inside brackets, numbers and
    hyphenated words joined again, every sentence starting with a capital."""
    text = clean_caption(text)
    text = _SPACED_HYPHEN.sub("-", text)
    text = _SPLIT_NUMBER.sub(lambda m: m.group(1) or m.group(2), text)
    text = _BEFORE_PUNCT.sub(r"\1", text)
    text = _AFTER_OPEN.sub(r"\1", text)
    text = _APOSTROPHE.sub("'", text)
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)
