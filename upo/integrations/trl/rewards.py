"""Auxiliary rewards for UPO, scored once per example while the dataset is prepared.

``aux_reward_funcs`` items are:

- names of upo's rewards, with or without a weight: ``"readability"``, ``"length:-0.1"``,
  ``"lexicon:hedging"``, and ``"column:NAME"`` for a number the dataset already holds
  (``NAME_chosen`` / ``chosen_NAME`` / ``NAME``, see ``upo.rewards.CombinedReward.score_batch``);
- callables called like TRL's ``GRPOTrainer`` calls reward functions: keyword lists
  ``prompts=``, ``completions=`` and every other column of the dataset, one float per
  completion. Each call gets a batch's chosen completions, then the same examples' rejected
  ones, so a function sees every completion exactly once.

The scores land in two columns of K floats per example, ``aux_rewards_chosen`` and
``aux_rewards_rejected`` (unweighted; the weights go to ``upo.loss`` as ``aux_weights``). A
dataset that already has both columns is used as it is.
"""
from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from upo.rewards import CombinedReward, RewardSpec, parse_reward_spec

CHOSEN_COLUMN, REJECTED_COLUMN = "aux_rewards_chosen", "aux_rewards_rejected"
AUX_COLUMNS = (CHOSEN_COLUMN, REJECTED_COLUMN)
_TEXT_COLUMNS = ("prompt", "chosen", "rejected")


def text_of(value: Any) -> str:
    """A prompt or completion as text: a string as it is, a list of messages as their contents."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return str(value)


def _spec(item: str) -> tuple[RewardSpec, bool]:
    """``(spec, weight_given)``: ``NAME`` and ``column:NAME`` get weight 1.0."""
    head, sep, last = item.rpartition(":")
    try:
        float(last)
        explicit = bool(sep) and bool(head)
    except ValueError:
        explicit = False
    return parse_reward_spec(item if explicit else f"{item}:1.0"), explicit


class AuxRewards:
    """The K auxiliary rewards of a run, in the order given."""

    def __init__(self, funcs: Sequence[str | Callable] | str | Callable | None):
        if funcs is None:
            funcs = []
        elif isinstance(funcs, str) or callable(funcs):
            funcs = [funcs]
        self._terms: list[tuple[str, Any]] = []  # (name, RewardSpec | callable)
        self._weights: list[float] = []
        self._explicit = False
        for item in funcs:
            if isinstance(item, str):
                spec, explicit = _spec(item)
                self._explicit |= explicit
                self._add(spec.label, spec, spec.weight)
            elif callable(item):
                self._add(getattr(item, "__name__", None) or type(item).__name__, item, 1.0)
            else:
                raise TypeError(f"aux_reward_funcs: {item!r} is neither a reward name nor a callable")
        specs = [obj for _, obj in self._terms if isinstance(obj, RewardSpec)]
        self._builtin = CombinedReward(specs)

    def _add(self, name: str, obj: Any, weight: float) -> None:
        base, copy = name, 1
        while name in self.names:
            copy += 1
            name = f"{base}_{copy}"
        self._terms.append((name, obj))
        self._weights.append(weight)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._terms]

    @property
    def explicit_weights(self) -> list[float] | None:
        """The weights, when a spec gave one (``readability:2.0``); ``None`` otherwise."""
        return list(self._weights) if self._explicit else None

    def __len__(self) -> int:
        return len(self._terms)

    def score(self, batch: dict[str, list], indices: Sequence[int] | None = None) -> dict[str, list[list[float]]]:
        """A ``datasets.map(batched=True, with_indices=True)`` function: the two aux columns of a batch."""
        prompts, chosen, rejected = batch["prompt"], batch["chosen"], batch["rejected"]
        count = len(prompts)
        builtin_chosen = builtin_rejected = None
        if len(self._builtin):
            rows = [{key: values[i] for key, values in batch.items()} for i in range(count)]
            texts = [text_of(p) for p in prompts]
            builtin_chosen, builtin_rejected = self._builtin.score_pairs(
                texts, [text_of(c) for c in chosen], [text_of(r) for r in rejected], rows)
        columns = []  # one list of 2 * count values per reward
        spec_index = 0
        for name, obj in self._terms:
            if isinstance(obj, RewardSpec):
                columns.append(builtin_chosen[:, spec_index].tolist() + builtin_rejected[:, spec_index].tolist())
                spec_index += 1
            else:
                columns.append(self._call(name, obj, batch, list(indices or range(count))))
        return {
            CHOSEN_COLUMN: [[column[i] for column in columns] for i in range(count)],
            REJECTED_COLUMN: [[column[count + i] for column in columns] for i in range(count)],
        }

    @staticmethod
    def _call(name: str, func: Callable, batch: dict[str, list], indices: list[int]) -> list[float]:
        """One call of a GRPO-style reward function on the batch's chosen then rejected completions."""
        count = len(indices)
        others = {key: list(values) * 2 for key, values in batch.items() if key not in _TEXT_COLUMNS}
        output = func(prompts=list(batch["prompt"]) * 2, completions=list(batch["chosen"]) + list(batch["rejected"]),
                      **others)
        if inspect.isawaitable(output):
            output = asyncio.run(_await(output))
        try:
            values = list(output)
        except TypeError:
            raise ValueError(f"aux reward {name!r} returned {type(output).__name__}, not a list of floats") from None
        if len(values) != 2 * count:
            raise ValueError(f"aux reward {name!r} returned {len(values)} values for {2 * count} completions "
                             f"(one float per completion: {count} chosen, then the same {count} examples' rejected)")
        checked = []
        for i, value in enumerate(values):
            side, example = ("chosen", indices[i]) if i < count else ("rejected", indices[i - count])
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise ValueError(f"aux reward {name!r} returned {value!r} for the {side} completion of example "
                                 f"{example} (rewards must be finite numbers)")
            checked.append(number)
        return checked


async def _await(awaitable):
    return await awaitable
