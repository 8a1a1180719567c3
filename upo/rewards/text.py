"""Text statistics behind the readability reward: words, sentences, syllables, Flesch reading ease."""
from __future__ import annotations

import re

# Flesch (1948): 206.835 - 1.015 * words/sentences - 84.6 * syllables/words
FLESCH_BASE = 206.835
FLESCH_SENTENCE_LENGTH = 1.015
FLESCH_WORD_LENGTH = 84.6

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")  # contractions stay one word
_SENTENCE_END = re.compile(r"[.!?]+")
_VOWEL_GROUP = re.compile(r"[aeiouy]+")
_VOWELS = frozenset("aeiouy")


def words(text: str) -> list[str]:
    """Alphabetic tokens of ``text`` (numbers and punctuation are not words)."""
    return _WORD.findall(text)


def count_sentences(text: str) -> int:
    """Pieces between ``.``, ``!`` and ``?`` that contain at least one word."""
    return sum(1 for piece in _SENTENCE_END.split(text) if _WORD.search(piece))


def count_syllables(word: str) -> int:
    """English syllables by heuristic: vowel groups minus a silent ending, at least 1.

    ``y`` counts as a vowel. A final ``e`` after a consonant is silent (make) except in
    consonant + ``le`` (table); ``-ed`` is silent unless after t/d (jumped, wanted);
    ``-es`` is silent unless after a sibilant (makes, boxes).
    """
    letters = re.sub(r"[^a-z]", "", word.lower())
    if not letters:
        return 0
    groups = len(_VOWEL_GROUP.findall(letters))
    if groups > 1 and _has_silent_ending(letters):
        groups -= 1
    return max(1, groups)


def _is_consonant(char: str) -> bool:
    return char not in _VOWELS


def _has_silent_ending(word: str) -> bool:
    # Callers guarantee two vowel groups, so the word has at least three letters.
    if word.endswith("e"):
        consonant_le = word.endswith("le") and _is_consonant(word[-3])
        return _is_consonant(word[-2]) and not consonant_le
    if word.endswith("ed"):
        return _is_consonant(word[-3]) and word[-3] not in "td"
    if word.endswith("es"):
        sibilant = word[-3] in "sxzcgj" or word.endswith(("ches", "shes"))
        consonant_les = word.endswith("les") and _is_consonant(word[-4])
        return _is_consonant(word[-3]) and not sibilant and not consonant_les
    return False


def flesch_reading_ease(text: str) -> float:
    """Raw Flesch reading ease (higher is easier; ~60-80 is plain English).

    Returns 0.0 for text without words instead of dividing by zero.
    """
    tokens = words(text)
    if not tokens:
        return 0.0
    sentences = max(1, count_sentences(text))
    syllables = sum(count_syllables(token) for token in tokens)
    return (
        FLESCH_BASE
        - FLESCH_SENTENCE_LENGTH * len(tokens) / sentences
        - FLESCH_WORD_LENGTH * syllables / len(tokens)
    )
