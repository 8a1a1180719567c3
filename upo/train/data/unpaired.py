"""Unpaired data, KTO's format as TRL names it: rows of ``prompt``, ``completion`` and ``label`` (True: the
completion is desirable), strings or chat messages; detecting, rendering, tokenising and scoring them.

A row is one completion of its prompt; nothing pairs the rows. Its batch (``collate.py``) holds ``N``
completion rows (and, for KTO, ``N`` mismatched rows: prompt ``i`` with completion ``i - 1``, as TRL's rotation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from upo.train.data.pairs import TokenizeSettings, is_conversation, render_messages, tokenize_responses
from upo.train.data.tokenizer import has_chat_template
from upo.train.errors import UserError

UNPAIRED_COLUMNS = ("prompt", "completion", "label")


def is_unpaired(record: dict) -> bool:
    """TRL's unpaired format: a ``completion`` or a ``label`` column and no ``chosen`` / ``rejected``."""
    return ("completion" in record or "label" in record) and not ("chosen" in record or "rejected" in record)


@dataclass
class RenderedCompletion:
    """The texts of one row: ``*_text`` are fed to the tokenizer, ``*_plain`` to reward functions."""

    prompt_text: str
    completion_text: str
    prompt_plain: str
    completion_plain: str
    ends_turn: bool = False  # rendered by the tokenizer's own chat template: no EOS appended (as RenderedPair)


@dataclass
class UnpairedExample:
    """One tokenised row. The completion ends with EOS; ``aux`` holds one score per auxiliary reward."""

    index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    aux: list[float] = field(default_factory=list)
    prompt_truncated: bool = False
    response_truncated: bool = False

    @property
    def responses(self) -> dict[str, list[int]]:
        return {"completion": self.completion_ids}


def check_label(value: Any, row: str) -> bool:
    """TRL's boolean ``label``; 0 and 1 are accepted too, anything else is a one-line error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise UserError(f"{row}: 'label' must be true (desirable) or false (undesirable), got {value!r}")


def render_unpaired(record: dict, tokenizer, row: str) -> tuple[RenderedCompletion, bool]:
    """One row's texts and its label."""
    for column in UNPAIRED_COLUMNS:
        if column not in record:
            raise UserError(f"{row}: missing column '{column}' (unpaired rows have prompt, completion, label)")
    label = check_label(record["label"], row)
    completion = record["completion"]
    if is_conversation(completion):
        prompt_text, prompt_plain, [(text, plain)] = render_messages(record["prompt"], [completion], tokenizer, row)
        return RenderedCompletion(prompt_text, text, prompt_plain, plain, has_chat_template(tokenizer)), label
    for column in ("prompt", "completion"):
        if not isinstance(record[column], str):
            raise UserError(f"{row}: column '{column}' must be a string or a list of messages, "
                            f"got {type(record[column]).__name__}")
    return RenderedCompletion(record["prompt"], completion, record["prompt"], completion), label


def tokenize_completion(rendered: RenderedCompletion, label: bool, tokenizer, settings: TokenizeSettings,
                        index: int, where: str) -> UnpairedExample:
    prompt, (completion,), prompt_truncated, response_truncated = tokenize_responses(
        rendered.prompt_text, {"completion": rendered.completion_text}, tokenizer, settings, where,
        add_eos=not rendered.ends_turn)
    return UnpairedExample(index, prompt, completion, label, prompt_truncated=prompt_truncated,
                           response_truncated=response_truncated)


def score_completions(reward, rows: list[dict], rendered: list[RenderedCompletion],
                      examples: list[UnpairedExample]) -> None:
    """Each completion's auxiliary rewards (a ``column:NAME`` reward reads the row's ``NAME``)."""
    try:
        scores = reward.score_batch([r.prompt_plain for r in rendered], [r.completion_plain for r in rendered], rows)
    except ValueError as err:  # e.g. a column reward naming a column the data lacks
        first = examples[0].index
        raise UserError(f"auxiliary reward on rows {first}..{first + len(rows) - 1}: {err}") from None
    for example, values in zip(examples, scores.tolist()):
        example.aux = values
