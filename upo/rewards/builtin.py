"""The reward registry and the built-in rewards: readability, length, lexicon (word lists)."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Callable

from upo.rewards.text import flesch_reading_ease, words

RewardFn = Callable[[str, str], float]

RESOURCES_DIR = Path(__file__).resolve().parent.parent / "resources"
DEFAULT_LEXICON = "jargon"
READABILITY_SCALE = 100.0
READABILITY_FLOOR = -1.0  # one very long word can reach -700 raw; keep rewards bounded
LENGTH_SCALE = 100.0

_REGISTRY: dict[str, RewardFn] = {}
COLUMN = "column"
TAKES_ARGUMENT = ("column", "lexicon")  # KIND:ARG:WEIGHT forms


def register_reward(name: str, *, overwrite: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``f(prompt, response) -> float`` available as ``NAME:WEIGHT``."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"reward name {name!r} must be an identifier (no ':' or spaces)")
    if name == COLUMN:
        raise ValueError(f"reward name {COLUMN!r} is reserved for dataset columns")

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"reward {name!r} is already registered (pass overwrite=True)")
        _REGISTRY[name] = fn
        return fn

    return decorator


def unregister_reward(name: str) -> None:
    """Remove a registered reward (KeyError if absent)."""
    del _REGISTRY[name]


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def available_rewards() -> list[str]:
    """Names usable in specs: the registered rewards plus ``column``."""
    return sorted([*_REGISTRY, COLUMN])


def get_reward(name: str) -> RewardFn:
    """The registered function for ``name``; ValueError listing known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(unknown_name_message(name)) from None


def unknown_name_message(name: str, spec: str | None = None) -> str:
    where = f"reward spec {spec!r}: " if spec is not None else ""
    return f"{where}unknown reward {name!r}; known: {', '.join(available_rewards())}"


@register_reward("readability")
def readability(prompt: str, response: str) -> float:
    """Flesch reading ease of the response / 100, floored at -1 (0.0 for no words)."""
    return max(READABILITY_FLOOR, flesch_reading_ease(response) / READABILITY_SCALE)


@register_reward("length")
def length(prompt: str, response: str) -> float:
    """Whitespace-separated words of the response / 100."""
    return len(response.split()) / LENGTH_SCALE


def bundled_lexicons() -> list[str]:
    """Names of the word lists shipped as ``resources/lexicon_NAME.txt``."""
    return sorted(path.stem[len("lexicon_"):] for path in RESOURCES_DIR.glob("lexicon_*.txt"))


def lexicon_file(source: str | Path) -> Path:
    """A bundled list name (``jargon``) or a path to a word file, as a checked path."""
    if isinstance(source, str) and re.fullmatch(r"\w+", source):
        bundled = RESOURCES_DIR / f"lexicon_{source}.txt"
        if bundled.is_file():
            return bundled
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"lexicon {str(source)!r} is neither a bundled list "
            f"({', '.join(bundled_lexicons())}) nor an existing file"
        )
    return path


@lru_cache(maxsize=32)
def _load_lexicon_cached(path: str) -> frozenset[str]:
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip().lower()  # '#' starts a comment
        if entry:
            entries.append(entry)
    if not entries:
        raise ValueError(f"lexicon file {path!r} has no words")
    return frozenset(entries)


def load_lexicon(source: str | Path = DEFAULT_LEXICON) -> frozenset[str]:
    """Lower-cased words of a list: one word per line, ``#`` comments, blank lines ignored.

    Files are read once and cached by path.
    """
    return _load_lexicon_cached(str(lexicon_file(source).resolve()))


def lexicon_fraction(text: str, vocabulary: frozenset[str]) -> float:
    """Fraction of the words of ``text`` (lower-cased) that are in ``vocabulary``."""
    tokens = [token.lower() for token in words(text)]
    if not tokens:
        return 0.0
    return sum(token in vocabulary for token in tokens) / len(tokens)


@register_reward("lexicon")
def lexicon(prompt: str, response: str, lexicon_path: str | Path | None = None) -> float:
    """Fraction of response words in a word list (default: the bundled jargon list)."""
    return lexicon_fraction(response, load_lexicon(lexicon_path or DEFAULT_LEXICON))
