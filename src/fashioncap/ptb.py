"""COCO-exact caption tokens without Java: what `pycocoevalcap`'s PTBTokenizer (Stanford CoreNLP 3.4.1,
`-preserveLines -lowerCase`) followed by its punctuation removal makes of a caption.

Every published captioning number (COCO, BLIP/LAVIS, the FACAD fashion baselines) is computed on these
tokens, so the project scores on them too. The base is nltk's Treebank tokenizer (the same PTB rules:
contractions "is n't", "can not", split currency and percent signs, brackets as -LRB-); the rules below
make up the places where Stanford's tokenizer differs, each found by running both on real and
fashion-style captions (tests/unit/test_ptb.py keeps the Java tokenizer as the oracle):

- no "/" escaping in 3.4.1; words joined by slashes stay one token, in runs of at most three
  ("xs/s/m / l/xl"), and a slash next to a decimal number or at a word's end is split off;
- a period ends a word unless the word is a known abbreviation (Stanford's lists: titles, months,
  companies, "etc", "vs", single letters and acronyms such as "u.s.", and "no."/"ca." before a number);
- a decimal number glued to a unit is two tokens ("7.5cm" -> "7.5 cm"; "110cm" stays one);
- a whole number of up to four digits and a fraction after one space are one token, joined by a no-break space
  ("38 1/2" -> "38\u00a01/2", Stanford's FRAC): pycocoevalcap's ROUGE-L splits on plain spaces only, so it
  scores that as one word, where its BLEU and CIDEr-D (`str.split()`) see two; joined by a hyphen too
  ("2-1/2-inch" -> "2-1/2 inch"), where another hyphenated number ends its word at a slash ("a-1/2" ->
  "a-1 / 2");
- unicode fractions are spelled out ("7½" -> "7 1/2", two tokens);
- unicode dashes, the ellipsis character and two periods are punctuation ("--", "..."), "£" and "€" become "#" and
  "$", symbols such as "®", "™", "°", "~" are tokens of their own; runs of "!" and "?" stay one token;
- an opening single quote is split off a word ("'the" -> "` the") except in "'n'", "'em", "'90s", and
  "'tis" is "'t is";
- "<...>" stays one token (SGML), only (), [] and {} are brackets;
- contractions, possessives and quotes are found in any case ("MEN'S", "DON'T", "IsN't"), as Stanford's
  lexer does: product copy is often in capitals;
- a single letter's period is split off before a word that usually starts a sentence ("size M. The" ->
  "M . The", but "size M. Dress"), also across captions: COCO tokenises a set of captions as one text, a
  caption a line, so a caption's last token depends on the next caption's first word (`coco_corpus`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, compared after lower-casing as there: the bracket
# tokens come out of the Java tokenizer lower-cased ("-lrb-"), so they stay, a quirk every published
# number includes
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"])

# Stanford PTBLexer's abbreviations (case as there): a period after them stays part of the word
_MONTHS = "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
_DAYS = "Mon|Tue|Tues|Wed|Thu|Thurs|Fri"
_STATES = ("Ala|Ariz|[Aa]z|[Aa]rk|Calif|Colo|Conn|Ct|Dak|Del|Fla|Ga|[Ii]ll|Ind|Kans?|Ky|La|[Mm]ass|Md|Mich|Minn|"
           "[Mm]iss|Mo|Mont|Neb|Nev|Okla|[Oo]re|Pa|Penn|Tenn|Tex|Va|Vt|[Ww]ash|Wisc?|Wyo")
_COMPANIES = "Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Bancorp|Dept|Bhd|Assn|Univ|Intl|Sys"
_TITLES = ("Mr|Mrs|Ms|[Mm]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|"
           "Mt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|M|MM|Mme|Mmes|Mlle|Mlles")
_ABBREVIATION = re.compile(
    rf"(?:{_MONTHS}|{_DAYS}|{_STATES}|{_COMPANIES}|tel|est|ext|sq|Jr|Sr|Bros|Blvd|Rd|Esq|etc|al|seq|"
    rf"[A-Za-z]|{_TITLES}|vs|Alex|Wm|Jos|Cie|cf|TREAS|[A-Za-z](?:\.[A-Za-z])+|(?:Ed|Ph)\.D|a\.k\.a)\.", re.I)
_BEFORE_NUMBER = re.compile(r"(?:ca|figs?|prop|nos?|art|bldg|pp|op)\.", re.I)
# Stanford's FRAC where a token starts: 1-4 digits, a space or hyphen, 1-4 digits, a slash (or fraction slash)
# and 1-4 digits, whatever follows ("38 1/2cm" -> "38 1/2" "cm"; "38 1/23456" -> "38 1/2345" "6")
_WHOLE_AND_FRACTION = re.compile(r"(?<![^\s(\[{$#\"`])(\d{1,4})([ \u00a0-])(\d{1,4}(?:\\?/|\u2044)\d{1,4})")
# the no-break space and the hyphen inside such a token while the other rules run (they split at spaces, and at
# the slash after a hyphenated number)
_NO_BREAK, _HYPHEN = "\ue001", "\ue002"
_HYPHENATED_NUMBER = re.compile(r".-\d+$")
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
# after "X." these start a sentence for Stanford's lexer (capitalised; the rest of the word in any case): each
# one measured against the Java tokenizer, as were words it does not split before ("I", "And", "On", "For",
# "Its", "Those", "Dress", "Slim", ...)
_SENTENCE_STARTS = frozenset("""a an the this that these it he she we they you her our their in at as but so yet if
when while what however there here then after since once now some many one""".split())
_LETTER_PERIOD = re.compile(r"[A-Za-z]\.")
_ATTACHED = re.compile(r"'(?:s|re|ll|d|m|ve)|n't|[,;:.!?%]", re.I)  # what nltk splits off the word before it
_FIRST_WORD = re.compile(r"\s*([A-Za-z]+)(?=\s|$)")  # a whole word: "It's", "It," and "It." start none
_JOINED_CAPITALS = re.compile(r"(?<![\w-])(?<!\S/)[A-Z]+(?:&[A-Z]+)+")
_LEADING = re.compile(r"(?:_+|[-.](?![-.]?\d))(?=.*\w)")  # one starting a word is split off ("-y", ".com", "_5")
_TRAILING = re.compile(r"(?<=[^\W_])(?:-+|_+)$")  # and hyphens or underscores ending one ("y-")
_BRACKET = re.compile(r"-[LR][RSC]B-")  # a bracket, as convert_parentheses writes it
_JOINED = "\ue000"  # the "&" inside such a token while the Treebank rules run (they split every other one)
_DECIMAL_UNIT = re.compile(r"^(\d*\.\d+)([A-Za-z]+)$")
_SLASHED = re.compile(r"^[\w.-]+(?:/[\w.-]+)+$")
_DECIMAL = re.compile(r"\d\.\d")
_QUOTED_START = re.compile(r"^'(?!(?:n'?|t|em|\d0s|[sdm]|ll|re|ve)$)(?=\w)", re.I)  # "MEN'S" too


@lru_cache(maxsize=1)
def _treebank():
    from nltk.tokenize import TreebankWordTokenizer

    class _StanfordTreebank(TreebankWordTokenizer):
        # Stanford keeps "<...>" whole (SGML) and pads the symbols nltk leaves attached
        PARENS_BRACKETS = (re.compile(r"[\]\[\(\)\{\}]"), r" \g<0> ")
        PUNCTUATION = [
            *TreebankWordTokenizer.PUNCTUATION[:3],
            (re.compile(r"[;@#$%~®™©°&]"), r" \g<0> "),
            *TreebankWordTokenizer.PUNCTUATION[4:5],
            (re.compile(r"[?!]+"), r" \g<0> "),
            *TreebankWordTokenizer.PUNCTUATION[6:],
        ]
        # Stanford splits contractions in any case ("DON'T", "IsN't", "yoU'Ll"); nltk only in all-lower or
        # all-upper
        ENDING_QUOTES = [
            *TreebankWordTokenizer.ENDING_QUOTES[:3],
            (re.compile(r"(?i)([^' ])('ll|'re|'ve|n't) "), r"\1 \2 "),
        ]

    return _StanfordTreebank()


def _joined_fraction(match: re.Match) -> str:
    whole, joint, fraction = match.groups()
    return f" {whole}{_HYPHEN if joint == '-' else _NO_BREAK}{fraction} "


def _before(text: str) -> str:
    text = text.replace("\n", " ")
    # before the unicode fractions are spelled out: "7½" is two tokens ("7 1/2"), "7 1/2" one
    text = _WHOLE_AND_FRACTION.sub(_joined_fraction, text)
    # capitals joined by "&" ("AT&T", "H&M") are a token of their own where a token may start: every other
    # "&" is split off, and what follows the capitals is a new token ("AT&Ts" -> "AT&T s")
    while (joined := _JOINED_CAPITALS.sub(lambda m: f" {m.group(0).replace('&', _JOINED)} ", text)) != text:
        text = joined  # again: "A&B/C&D" has a token start after the slash once "A&B" stands alone
    text = re.sub(r"[\u2013\u2014\u2015]", " -- ", text)
    text = text.replace("\u2026", " ... ").replace("£", "#").replace("€", "$")
    for fraction, spelled in _FRACTIONS.items():
        text = text.replace(fraction, f" {spelled}")
    text = re.sub(r"\brock'n'roll\b", "rock 'n' roll", text, flags=re.I)
    text = re.sub(r"(?<=\d)'(?=\d)", " ' ", text)  # 6'2": feet and inches
    # two or more periods are an ellipsis ("racket..it" -> "racket ... it"), but after a lone letter or an
    # acronym an abbreviation's period first ("S..XL" -> "S. . XL", "U.S.." -> "U.S. ."), between digits a
    # period and a decimal ("3..4" -> "3 . .4")
    text = re.sub(r"(?<![A-Za-z.])([A-Za-z])\.\.(?!\.)", r"\1. . ", text)
    text = re.sub(r"(?<=[A-Za-z]\.[A-Za-z])\.\.(?!\.)", ". . ", text)
    text = re.sub(r"(?<=\d)\.\.(?=\d)", " . .", text)
    text = re.sub(r"(?<!\.)\.{2,}", " ... ", text)
    return re.sub(r"(?i)(?<![\w'])'tis\b", "'t is", text)


def _split_slashes(token: str) -> list[str]:
    """Words joined by slashes: runs of at most three stay one token; slashes next to a decimal number
    or at an end are tokens of their own."""
    if "/" not in token or token == "/" or _NO_BREAK in token or _HYPHEN in token:
        return [token]
    if not _SLASHED.match(token) or _DECIMAL.search(token):
        return [p for p in re.split(r"(/)", token) if p]
    runs: list[list[str]] = [[]]
    for part in token.split("/"):
        runs[-1].append(part)
        if _HYPHENATED_NUMBER.search(part):  # a word ends at a hyphenated number: "a-1/2" -> "a-1 / 2"
            runs.append([])
    out: list[str] = []
    for parts in filter(None, runs):
        for start in range(0, len(parts), 3):
            if out:
                out.append("/")
            out.append("/".join(parts[start : start + 3]))
    return out


def _starts_sentence(text: str | None) -> bool:
    """Whether `text` begins with a word after which Stanford's lexer ends a sentence at a letter's period."""
    word = _FIRST_WORD.match(text or "")
    return bool(word) and word.group(1)[0].isupper() and word.group(1).lower() in _SENTENCE_STARTS


def _split_period(token: str, following: str | None) -> list[str]:
    """A word's final period is a token of its own unless the word is an abbreviation."""
    if len(token) < 2 or not token.endswith(".") or token.endswith(".."):
        return [token]
    if _LETTER_PERIOD.fullmatch(token) and _starts_sentence(following):
        return [token[:-1], "."]
    if _ABBREVIATION.fullmatch(token):
        return [token]
    if _BEFORE_NUMBER.fullmatch(token) and following is not None and following[:1].isdigit():
        return [token]
    if re.fullmatch(r"\d*\.\d+\.?", token) and not token.endswith("."):
        return [token]
    return [token[:-1], "."]


# Most captions hold only words, numbers, hyphens and a comma or period at a word's end: for them the
# Treebank rules reduce to splitting those off, 10x faster than running them (a test holds both equal)
_PLAIN = re.compile(r"[A-Za-z0-9 ,.\-]*")
_NOT_PLAIN = re.compile(r",\S|\.\.|--|(?:^|\s)[,.]|(?:^|\s)-(?!\d)|-(?=[\s,.]|$)|^[.,\s-]*$|(?i:\b(?:cannot|gimme|gonna|gotta|lemme|wanna)\b)")


def _plain_tokens(caption: str) -> list[str]:
    words = caption.split()
    tokens: list[str] = []
    for i, word in enumerate(words):
        comma = word.endswith(",")
        word = word[:-1] if comma else word
        following = words[i + 1] if i + 1 < len(words) else None
        final_period = following is None and word.endswith(".") and not comma and len(word) > 1
        base = word[:-1] if final_period else word  # nltk splits the final period off first
        unit = _DECIMAL_UNIT.match(base)
        pieces = [unit.group(1), unit.group(2)] if unit else [base]
        if final_period:
            tokens += pieces[:-1] + ([pieces[-1] + "."] if _ABBREVIATION.fullmatch(pieces[-1] + ".")
                                     else [pieces[-1], "."])
        elif unit:
            tokens += pieces
        else:
            tokens += _split_period(word, following)
        if comma:
            tokens.append(",")
    return [t.lower() for t in tokens]


def ptb_tokens(caption: str) -> list[str]:
    """The caption's tokens as Stanford's PTBTokenizer writes them with -lowerCase (punctuation kept)."""
    if _PLAIN.fullmatch(caption) and not _NOT_PLAIN.search(caption):
        return _plain_tokens(caption)
    return _slow_tokens(caption)


def _slow_tokens(caption: str) -> list[str]:
    raw = []
    for token in _treebank().tokenize(_before(caption), convert_parentheses=True):
        while (lead := _LEADING.match(token)) and not _BRACKET.fullmatch(token):
            raw.append(lead.group(0))
            token = token[lead.end():]
        trailing = None if _BRACKET.fullmatch(token) else _TRAILING.search(token)
        raw.extend([token[:trailing.start()], trailing.group(0)] if trailing else [token])
    tokens: list[str] = []
    for i, token in enumerate(raw):
        following = raw[i + 1] if i + 1 < len(raw) else None
        if following and i + 2 < len(raw) and _ATTACHED.fullmatch(raw[i + 2]):
            following += raw[i + 2]  # nltk split "It's" and "It," apart: the word was not whole
        for piece in _split_slashes(token):
            unit = _DECIMAL_UNIT.match(piece)
            pieces = [unit.group(1), unit.group(2)] if unit else [piece]
            for p in pieces:
                quoted = _QUOTED_START.match(p)
                if quoted and len(p) > 1:
                    tokens.extend(["`", *_split_period(p[1:], following)])
                else:
                    tokens.extend(_split_period(p, following))
    merged: list[str] = []
    for token in tokens:
        if token == "'" and merged and merged[-1].lower() == "'n":  # nltk splits the closing quote off "'n'"
            merged[-1] = "'n'"
        else:
            merged.append(token)
    if len(merged) > 1 and merged[-1] == "." and _ABBREVIATION.fullmatch(merged[-2] + "."):
        merged[-2:] = [merged[-2] + "."]  # nltk splits the final period off "etc." too
    return [t.lower().replace(_JOINED, "&").replace(_NO_BREAK, "\u00a0").replace(_HYPHEN, "-")
            for t in merged]


@lru_cache(maxsize=1 << 16)  # references are scored again at every validation
def coco_tokens(caption: str) -> str:
    """The caption as the COCO evaluation scores it: PTB tokens, lower case, punctuation tokens dropped,
    joined by single spaces."""
    return " ".join(t for t in ptb_tokens(caption) if t not in PUNCTUATIONS)


def coco_corpus(captions: Sequence[str]) -> list[str]:
    """`coco_tokens` of each caption as one run of COCO's tokenizer over all of them (a line each) makes them:
    a caption ending in a single letter's period loses it where the next caption starts a sentence."""
    out = [coco_tokens(c) for c in captions]
    for i in range(len(captions) - 1):
        if out[i].endswith(".") and _starts_sentence(captions[i + 1]) and _LETTER_PERIOD.fullmatch(
                ptb_tokens(captions[i])[-1]):
            out[i] = out[i][:-1]
    return out
