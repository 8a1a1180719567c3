"""Designer rewards ``a_k(x, y)``: auxiliary objectives scored on text before the step.

UPO (DESIGN.md section 1) adds an advantage-weighted term on
``r_aux(x, y) = sum_k w_k * a_k(x, y)``. This module computes the ``a_k`` on CPU, one
float per (prompt, response), without third-party dependencies, and keeps their weights::

    rewards = CombinedReward.from_specs(["readability:1.0", "length:-0.1"])
    scores = rewards.score_batch(prompts, responses, rows)   # float32 [B, K], unweighted
    r_aux = rewards.combine(scores)                          # [B] = scores @ weights
    rewards.names, rewards.weights                           # ["readability", "length"], [1.0, -0.1]

Spec strings (``parse_reward_spec``):

    NAME:WEIGHT              a registered reward (``available_rewards()``)
    column:COLUMN:WEIGHT     a precomputed number in the dataset row (see ``score_batch``)
    lexicon:LIST:WEIGHT      word-list reward with a bundled list name or a path to a file

Built-ins and their scales; every one is O(1) on normal text so that
``exp(A / beta_aux)`` stays in a sane range with unit weights:

    readability  Flesch reading ease / 100, floored at -1. Plain prose is ~0.6-1.0,
                 dense technical prose ~0-0.3; the formula's ceiling is ~1.21.
                 Text without words scores 0.0.
    length       whitespace-separated words / 100 (a 50-word answer scores 0.5).
    lexicon      fraction of the response's words found in a word list (0..1). The
                 default list is ``resources/lexicon_jargon.txt``, so give it a negative
                 weight to penalise jargon.

Only the response is scored by the built-ins; the prompt is passed so that user
callables ``f(prompt, response) -> float`` may use it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch

RewardFn = Callable[[str, str], float]
Row = Mapping[str, Any]

RESOURCES_DIR = Path(__file__).resolve().parent / "resources"
DEFAULT_LEXICON = "jargon"
READABILITY_SCALE = 100.0
READABILITY_FLOOR = -1.0  # one very long word can reach -700 raw; keep rewards bounded
LENGTH_SCALE = 100.0
SIDES = ("chosen", "rejected")

# Flesch (1948): 206.835 - 1.015 * words/sentences - 84.6 * syllables/words
FLESCH_BASE = 206.835
FLESCH_SENTENCE_LENGTH = 1.015
FLESCH_WORD_LENGTH = 84.6

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")  # contractions stay one word
_SENTENCE_END = re.compile(r"[.!?]+")
_VOWEL_GROUP = re.compile(r"[aeiouy]+")
_VOWELS = frozenset("aeiouy")


# --------------------------------------------------------------------------- text statistics


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


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, RewardFn] = {}
_COLUMN = "column"
_TAKES_ARGUMENT = ("column", "lexicon")  # KIND:ARG:WEIGHT forms


def register_reward(name: str, *, overwrite: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``f(prompt, response) -> float`` available as ``NAME:WEIGHT``."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"reward name {name!r} must be an identifier (no ':' or spaces)")
    if name == _COLUMN:
        raise ValueError(f"reward name {_COLUMN!r} is reserved for dataset columns")

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"reward {name!r} is already registered (pass overwrite=True)")
        _REGISTRY[name] = fn
        return fn

    return decorator


def unregister_reward(name: str) -> None:
    """Remove a registered reward (KeyError if absent)."""
    del _REGISTRY[name]


def available_rewards() -> list[str]:
    """Names usable in specs: the registered rewards plus ``column``."""
    return sorted([*_REGISTRY, _COLUMN])


def get_reward(name: str) -> RewardFn:
    """The registered function for ``name``; ValueError listing known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(_unknown_name_message(name)) from None


def _unknown_name_message(name: str, spec: str | None = None) -> str:
    where = f"reward spec {spec!r}: " if spec is not None else ""
    return f"{where}unknown reward {name!r}; known: {', '.join(available_rewards())}"


# --------------------------------------------------------------------------- built-ins


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


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class RewardSpec:
    """One weighted reward: a registered ``name``, or ``column`` with ``arg`` = column name.

    ``arg`` is also the list name or file for ``lexicon``.
    """

    name: str
    weight: float
    arg: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _check_weight(self.weight, self.label))
        if self.name == _COLUMN and not self.arg:
            raise ValueError("reward spec 'column' needs a column name: column:COLUMN:WEIGHT")

    @property
    def label(self) -> str:
        """The name used in logs and ``CombinedReward.names``: ``readability``, ``column:score``."""
        return self.name if self.arg is None else f"{self.name}:{self.arg}"

    def __str__(self) -> str:
        return f"{self.label}:{float(self.weight)!r}"


def parse_reward_spec(text: str) -> RewardSpec:
    """Parse ``NAME:WEIGHT``, ``column:COLUMN:WEIGHT`` or ``lexicon:LIST:WEIGHT``.

    The weight is the text after the last ``:``, so a lexicon path may contain colons.
    """
    if not isinstance(text, str):
        raise TypeError(f"reward spec must be a string, got {type(text).__name__}")
    name, sep, rest = text.strip().partition(":")
    name = name.strip()
    if not sep or not rest.strip():
        raise ValueError(
            f"reward spec {text!r}: expected NAME:WEIGHT, column:COLUMN:WEIGHT "
            "or lexicon:LIST:WEIGHT"
        )
    if name != _COLUMN and name not in _REGISTRY:
        raise ValueError(_unknown_name_message(name, spec=text))
    arg = None
    if ":" in rest:
        if name not in _TAKES_ARGUMENT:
            raise ValueError(f"reward spec {text!r}: {name!r} takes no argument; use {name}:WEIGHT")
        arg, _, rest = rest.rpartition(":")
        arg = arg.strip()
        if not arg:
            raise ValueError(f"reward spec {text!r}: empty argument before the weight")
    elif name == _COLUMN:
        raise ValueError(f"reward spec {text!r}: expected column:COLUMN:WEIGHT")
    return RewardSpec(name, _parse_weight(rest, text), arg)


def _parse_weight(text: str, spec: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise ValueError(f"reward spec {spec!r}: weight {text.strip()!r} is not a number") from None
    return _check_weight(weight, spec)


def _check_weight(weight: Any, spec: str) -> float:
    """A finite float; bools and strings are refused because they are almost always slips."""
    if isinstance(weight, (bool, str, bytes)):
        raise ValueError(f"reward spec {spec!r}: weight {weight!r} is not a number")
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"reward spec {spec!r}: weight {weight!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"reward spec {spec!r}: weight {weight!r} is not finite")
    return value


def parse_reward_specs(specs: str | Iterable[str | RewardSpec]) -> list[RewardSpec]:
    """Parse several specs: a list, or one comma-separated string (``"readability:1,length:-0.1"``)."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    parsed = [
        item if isinstance(item, RewardSpec) else parse_reward_spec(item)
        for item in items
        if not (isinstance(item, str) and not item.strip())
    ]
    labels = [spec.label for spec in parsed]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"reward specs repeat {', '.join(duplicates)}; give each reward once")
    return parsed


# --------------------------------------------------------------------------- combination

TermFn = Callable[[str, str, Union[Row, None], Union[str, None]], Any]
RewardItem = Union[str, RewardSpec, tuple]


@dataclass(frozen=True)
class _Term:
    name: str
    weight: float
    fn: TermFn  # (prompt, response, row, side) -> number


class CombinedReward:
    """K weighted rewards scored together.

    ``rewards`` items may be spec strings (``"length:-0.1"``), ``RewardSpec`` objects,
    ``(name, weight)`` pairs with a spec name (``("column:score", 1.0)``) or
    ``(callable, weight)`` pairs where ``callable(prompt, response) -> float``; a
    callable is named by its ``__name__`` (made unique with ``_2``, ``_3``...).
    """

    def __init__(self, rewards: Iterable[RewardItem] = ()) -> None:
        self._terms: list[_Term] = []
        for item in rewards:
            self._terms.append(self._make_term(item))

    @classmethod
    def from_specs(cls, specs: str | Iterable[RewardItem]) -> "CombinedReward":
        """From spec strings (a list or one comma-separated string) or any ``__init__`` items."""
        if isinstance(specs, str):
            specs = parse_reward_specs(specs)
        return cls(specs)

    # -- construction

    def _make_term(self, item: RewardItem) -> _Term:
        if isinstance(item, str):
            item = parse_reward_spec(item)
        if isinstance(item, RewardSpec):
            return self._spec_term(item)
        if isinstance(item, tuple) and len(item) == 2:
            reward, weight = item
            if isinstance(reward, str):
                return self._spec_term(parse_reward_spec(f"{reward}:{weight}"))
            if callable(reward):
                return self._callable_term(reward, weight)
        raise TypeError(
            f"reward item {item!r}: expected a spec string, RewardSpec, "
            "(name, weight) or (callable, weight)"
        )

    def _spec_term(self, spec: RewardSpec) -> _Term:
        if spec.label in self.names:
            raise ValueError(f"reward {spec.label!r} given twice")
        if spec.name == _COLUMN:
            fn: TermFn = partial(_column_value, column=spec.arg)
        elif spec.name == "lexicon" and spec.arg is not None:
            load_lexicon(spec.arg)  # fail now, not at the first batch
            fn = _ignore_row(partial(lexicon, lexicon_path=spec.arg))
        else:
            fn = _ignore_row(get_reward(spec.name))
        return _Term(spec.label, spec.weight, fn)

    def _callable_term(self, reward: Callable[..., Any], weight: Any) -> _Term:
        base = re.sub(r"[^\w.-]", "", getattr(reward, "__name__", "")) or type(reward).__name__
        name, copy = base, 1
        while name in self.names:
            copy += 1
            name = f"{base}_{copy}"
        return _Term(name, _check_weight(weight, name), _ignore_row(reward))

    # -- properties

    @property
    def names(self) -> list[str]:
        return [term.name for term in self._terms]

    @property
    def weights(self) -> list[float]:
        return [term.weight for term in self._terms]

    def __len__(self) -> int:
        return len(self._terms)

    def __repr__(self) -> str:
        parts = ", ".join(f"{term.name}:{term.weight!r}" for term in self._terms)
        return f"CombinedReward({parts})"

    # -- scoring

    def score_terms(
        self, prompt: str, response: str, row: Row | None = None, side: str | None = None
    ) -> list[float]:
        """The K unweighted reward values of one response."""
        _check_side(side)
        return [_evaluate(term, prompt, response, row, side) for term in self._terms]

    def score(
        self, prompt: str, response: str, row: Row | None = None, side: str | None = None
    ) -> float:
        """The weighted sum ``sum_k w_k a_k(prompt, response)``."""
        values = self.score_terms(prompt, response, row, side)
        return float(sum(weight * value for weight, value in zip(self.weights, values)))

    def score_batch(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        rows: Sequence[Row] | None = None,
        side: str | Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """Unweighted rewards as a float32 tensor [B, K] (columns in ``names`` order).

        ``rows`` are the dataset rows (dicts), needed by ``column:`` rewards. With
        ``side`` = ``"chosen"``/``"rejected"`` (one for all, or one per item) a column
        ``NAME`` is looked up as ``NAME_side``, then ``side_NAME``, then ``NAME``
        (``score_chosen``, ``chosen_score``, ``score``); without a side, as ``NAME``.
        """
        batch = len(responses)
        if len(prompts) != batch:
            raise ValueError(f"score_batch: {len(prompts)} prompts but {batch} responses")
        if rows is not None and len(rows) != batch:
            raise ValueError(f"score_batch: {len(rows)} rows but {batch} responses")
        sides = _expand_sides(side, batch)
        table = []
        for i in range(batch):
            row = None if rows is None else rows[i]
            try:
                table.append(self.score_terms(prompts[i], responses[i], row, sides[i]))
            except ValueError as error:
                raise ValueError(f"{error} (batch item {i})") from None
        return torch.tensor(table, dtype=torch.float32).reshape(batch, len(self))

    def score_pairs(
        self,
        prompts: Sequence[str],
        chosen: Sequence[str],
        rejected: Sequence[str],
        rows: Sequence[Row] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores_chosen, scores_rejected)``, each [B, K], with sides set for columns."""
        return (
            self.score_batch(prompts, chosen, rows, side="chosen"),
            self.score_batch(prompts, rejected, rows, side="rejected"),
        )

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """Weighted sum over the last dim: [..., K] -> [...] (zeros when K = 0)."""
        if scores.shape[-1] != len(self):
            raise ValueError(f"combine: scores have {scores.shape[-1]} columns, expected {len(self)}")
        weights = torch.tensor(self.weights, dtype=scores.dtype, device=scores.device)
        return (scores * weights).sum(dim=-1)


def _ignore_row(fn: Callable[[str, str], Any]) -> TermFn:
    def term(prompt: str, response: str, row: Row | None, side: str | None) -> Any:
        return fn(prompt, response)

    return term


def _column_keys(column: str, side: str | None) -> tuple[str, ...]:
    if side is None:
        return (column,)
    return (f"{column}_{side}", f"{side}_{column}", column)


def _column_value(
    prompt: str, response: str, row: Row | None, side: str | None, *, column: str
) -> Any:
    if row is None:
        raise ValueError(f"reward 'column:{column}' needs the dataset rows (pass rows=...)")
    keys = _column_keys(column, side)
    for key in keys:
        if key in row:
            return row[key]
    raise ValueError(
        f"reward 'column:{column}': row has none of {', '.join(keys)} "
        f"(columns: {', '.join(sorted(map(str, row)))})"
    )


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, (str, bytes)):
        raise ValueError(f"reward {name!r} returned {value!r}, not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"reward {name!r} returned {value!r}, not a number") from None


def _evaluate(term: _Term, prompt: str, response: str, row: Row | None, side: str | None) -> float:
    value = _as_float(term.fn(prompt, response, row, side), term.name)
    if not math.isfinite(value):
        raise ValueError(f"reward {term.name!r} returned {value} (rewards must be finite)")
    return value


def _check_side(side: str | None) -> None:
    if side is not None and side not in SIDES:
        raise ValueError(f"side must be 'chosen', 'rejected' or None, got {side!r}")


def _expand_sides(side: str | Sequence[str | None] | None, batch: int) -> list[str | None]:
    if side is None or isinstance(side, str):
        return [side] * batch
    sides = list(side)
    if len(sides) != batch:
        raise ValueError(f"score_batch: {len(sides)} sides but {batch} responses")
    return sides
