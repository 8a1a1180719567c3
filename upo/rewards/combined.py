"""Weighted rewards from spec strings (``readability:1.0``, ``column:score:1``) scored together."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch

from upo.rewards.builtin import (
    COLUMN,
    TAKES_ARGUMENT,
    get_reward,
    is_registered,
    lexicon,
    load_lexicon,
    unknown_name_message,
)

Row = Mapping[str, Any]
SIDES = ("chosen", "rejected")


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
        if self.name == COLUMN and not self.arg:
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
    if name != COLUMN and not is_registered(name):
        raise ValueError(unknown_name_message(name, spec=text))
    arg = None
    if ":" in rest:
        if name not in TAKES_ARGUMENT:
            raise ValueError(f"reward spec {text!r}: {name!r} takes no argument; use {name}:WEIGHT")
        arg, _, rest = rest.rpartition(":")
        arg = arg.strip()
        if not arg:
            raise ValueError(f"reward spec {text!r}: empty argument before the weight")
    elif name == COLUMN:
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
        if spec.name == COLUMN:
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
