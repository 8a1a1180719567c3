"""The ``filler`` reward: stock openers and closers ("Sure.", "Here is what you need to know.", "Hope this
helps.") at the two ends of an answer, a trait a chat model's own writing varies in.

A sentence is a piece of the text between ``.``, ``!``, ``?``, ``:``, ``;`` or a line break that holds a word;
it is *filler* when, lower-cased, without punctuation and with its spaces collapsed, it is one of the phrases of
``resources/filler_phrases.txt``. The score is the share of the answer's two ends that are filler: the first
sentence counts one half, the last the other half (a one-sentence answer is both ends), so 0, 0.5 or 1; an answer
without a sentence scores 0. Give it a negative weight (``filler:-1.0``) for a designer who wants no filler.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from upo.rewards.builtin import RESOURCES_DIR, register_reward

FILLER_PHRASES_FILE = RESOURCES_DIR / "filler_phrases.txt"
_SENTENCE_END = re.compile(r"[.!?:;\n]+")
_NOT_LETTER = re.compile(r"[^a-z' ]+")
_HAS_WORD = re.compile(r"[a-z]")


def normalize_sentence(text: str) -> str:
    """Lower-cased, curly apostrophes straightened, everything but letters, apostrophes and spaces dropped,
    spaces collapsed."""
    text = text.lower().replace("\u2019", "'")
    return " ".join(_NOT_LETTER.sub(" ", text).split())


def sentences(text: str) -> list[str]:
    """The normalised sentences of ``text`` that hold a letter, in order."""
    pieces = (normalize_sentence(piece) for piece in _SENTENCE_END.split(text))
    return [piece for piece in pieces if _HAS_WORD.search(piece)]


@lru_cache(maxsize=8)
def load_filler_phrases(path: str = str(FILLER_PHRASES_FILE)) -> frozenset[str]:
    """The normalised phrases of a phrase file: one per line, ``#`` comments and blank lines ignored."""
    lines = (line.split("#", 1)[0] for line in Path(path).read_text(encoding="utf-8").splitlines())
    phrases = frozenset(normalize_sentence(line) for line in lines if line.strip())
    if not phrases:
        raise ValueError(f"filler phrase file {path!r} has no phrases")
    return phrases


def filler_share(text: str, phrases: frozenset[str]) -> float:
    """The share of ``text``'s two ends (first and last sentence) that are one of ``phrases``."""
    found = sentences(text)
    if not found:
        return 0.0
    return ((found[0] in phrases) + (found[-1] in phrases)) / 2


@register_reward("filler")
def filler(prompt: str, response: str) -> float:
    """Share of the response's two ends (first and last sentence) that are stock filler: 0, 0.5 or 1."""
    return filler_share(response, load_filler_phrases())
