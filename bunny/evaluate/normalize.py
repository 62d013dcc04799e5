"""Answer normalisation for exact-match accuracy: ``"The Circle."`` and ``"circle"`` agree.

Steps, in order: lower case; split on whitespace; each word loses its surrounding punctuation;
a number in digits becomes its canonical decimal (``"3.50"`` -> ``"3.5"``, ``"1,000"`` ->
``"1000"``, ``"+2"`` -> ``"2"``), a number word up to ninety-nine its digits (``"two"`` ->
``"2"``, ``"twenty-one"`` -> ``"21"``); any punctuation left inside a word splits it
(``"black-and-white"`` -> ``"black and white"``) except apostrophes, which are dropped
(``"don't"`` -> ``"dont"``); the articles ``a``, ``an``, ``the`` go; words are joined by one space.
"""

from __future__ import annotations

import re
import string
import unicodedata
from decimal import Decimal, InvalidOperation

ARTICLES = frozenset({"a", "an", "the"})
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
NUMBER_WORDS: dict[str, int] = {word: value for value, word in enumerate(_UNITS)}
NUMBER_WORDS.update({tens: 20 + 10 * i for i, tens in enumerate(_TENS)})
NUMBER_WORDS.update({f"{tens}-{unit}": 20 + 10 * i + u
                     for i, tens in enumerate(_TENS) for u, unit in enumerate(_UNITS[1:10], start=1)})
_NUMERAL = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?|[+-]?\.\d+")
_PUNCTUATION = "".join(sorted(set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014", "\u2026"}))
_APOSTROPHES = "'\u2018\u2019"
_LEADING = "".join(c for c in _PUNCTUATION if c not in "+-.")
_INNER_PUNCTUATION = re.compile("[" + re.escape("".join(c for c in _PUNCTUATION if c not in _APOSTROPHES)) + "]+")


def _canonical_number(word: str) -> str | None:
    if _NUMERAL.fullmatch(word):
        try:
            value = Decimal(word.replace(",", ""))
        except InvalidOperation:
            return None
        if value == value.to_integral_value():
            return str(int(value))
        return format(value.normalize(), "f")
    if word in NUMBER_WORDS:
        return str(NUMBER_WORDS[word])
    return None


def normalize_answer(text: str) -> str:
    """The comparable form of an answer (see the module docstring)."""
    words: list[str] = []
    for raw in unicodedata.normalize("NFKC", text).lower().split():
        word = raw.strip(_PUNCTUATION)
        number = _canonical_number(raw.lstrip(_LEADING).rstrip(_PUNCTUATION))  # keeps a sign or a leading dot
        if number is not None:
            words.append(number)
            continue
        for part in _INNER_PUNCTUATION.sub(" ", word.translate({ord(c): None for c in _APOSTROPHES})).split():
            number = _canonical_number(part)
            if number is not None:
                words.append(number)
            elif part not in ARTICLES:
                words.append(part)
    return " ".join(words)


def answers_match(answer: str, reference: str) -> bool:
    """Exact match after :func:`normalize_answer`; an empty answer never matches."""
    normalized = normalize_answer(answer)
    return bool(normalized) and normalized == normalize_answer(reference)
