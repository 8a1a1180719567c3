"""Records to tokenised pairs: render (standard or conversational) text, tokenise and truncate, score rewards.

A preference record has a ``prompt`` and two responses, ``chosen`` and ``rejected`` (unpaired
rows, ``prompt``/``completion``/``label``: ``unpaired.py``). Two formats are accepted, as in TRL:

* standard: the three columns are strings;
* conversational: they are lists of ``{"role", "content"}`` messages (``prompt`` may be
  omitted, in which case the shared prefix of ``chosen`` and ``rejected`` is the prompt).
  Messages are rendered with the tokenizer's chat template, or with
  :func:`simple_chat_template` when the tokenizer has none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from upo.train.data.tokenizer import encode_text, has_chat_template, simple_chat_template
from upo.train.errors import UserError

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class RenderedPair:
    """The texts of one pair: ``*_text`` are fed to the tokenizer, ``*_plain`` to reward functions.
    ``ends_turn``: the responses were rendered by the tokenizer's own chat template, which ends each turn
    itself (no EOS is appended then, as in TRL)."""

    prompt_text: str
    chosen_text: str
    rejected_text: str
    prompt_plain: str
    chosen_plain: str
    rejected_plain: str
    ends_turn: bool = False


def is_conversation(value: Any) -> bool:
    """A column in the conversational format: a list of ``{"role", "content"}`` messages."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _check_messages(messages: list, column: str, row) -> None:
    """Each message a ``{"role": str, "content": str}``: the chat template reads both."""
    for k, message in enumerate(messages):
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                problem = "has no" if key not in message else "has a non-string"
                raise UserError(f"{row}: message {k} of '{column}' {problem} '{key}'")


def render_record(record: dict, tokenizer, row) -> RenderedPair:
    """Turn one record (standard or conversational) into prompt/response strings.

    ``row`` names the record in errors: an index, or a description such as ``row 3 (d.jsonl line 4)``.
    """
    row = f"row {row}" if isinstance(row, int) else row
    for column in ("chosen", "rejected"):
        if column not in record:
            raise UserError(f"{row}: missing column '{column}'")
    if is_conversation(record["chosen"]):
        return _render_conversation(record, tokenizer, row)
    if "prompt" not in record:
        raise UserError(f"{row}: missing column 'prompt'")
    values = [record["prompt"], record["chosen"], record["rejected"]]
    for name, value in zip(REQUIRED_COLUMNS, values):
        if not isinstance(value, str):
            raise UserError(f"{row}: column '{name}' must be a string or a list of messages, "
                            f"got {type(value).__name__}")
    return RenderedPair(*values, *values)


def _render_conversation(record: dict, tokenizer, row: str) -> RenderedPair:
    chosen, rejected = record["chosen"], record["rejected"]
    if not is_conversation(rejected):
        raise UserError(f"{row}: 'chosen' is a list of messages but 'rejected' is not")
    _check_messages(chosen, "chosen", row)
    _check_messages(rejected, "rejected", row)
    prompt = record.get("prompt")
    if prompt is None:  # implicit prompt: the shared prefix of the two conversations
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    prompt_text, prompt_plain, [(chosen_text, chosen_plain), (rejected_text, rejected_plain)] = render_messages(
        prompt, [chosen, rejected], tokenizer, row)
    return RenderedPair(prompt_text, chosen_text, rejected_text, prompt_plain, chosen_plain, rejected_plain,
                        ends_turn=has_chat_template(tokenizer))


def render_messages(prompt: Any, responses: list[list[dict]], tokenizer, row: str):
    """A prompt (a string: one user message, or messages) and response conversations as text: ``(prompt_text,
    prompt_plain, [(response_text, response_plain), ...])``; ``*_text`` for the tokenizer, ``*_plain`` for rewards."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise UserError(f"{row}: 'prompt' must be a string or a list of messages")
    _check_messages(prompt, "prompt", row)

    prompt_text = _chat(tokenizer, prompt, add_generation_prompt=True)

    def response(messages: list[dict]) -> str:
        # As TRL: render prompt+response and keep what follows the rendered prompt.
        full = _chat(tokenizer, list(prompt) + list(messages), add_generation_prompt=False)
        if full.startswith(prompt_text):
            return full[len(prompt_text):]
        return "".join(str(m["content"]) for m in messages)

    def plain(messages: list[dict]) -> str:
        return "\n".join(str(m["content"]) for m in messages)

    return prompt_text, plain(prompt), [(response(messages), plain(messages)) for messages in responses]


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not has_chat_template(tokenizer):
        return simple_chat_template(messages, add_generation_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@dataclass
class PreferenceExample:
    """One tokenised pair. Responses end with EOS; ``aux_*`` hold one score per auxiliary reward."""

    index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    aux_chosen: list[float] = field(default_factory=list)
    aux_rejected: list[float] = field(default_factory=list)
    prompt_truncated: bool = False
    response_truncated: bool = False

    @property
    def responses(self) -> dict[str, list[int]]:
        """The response token ids by side, in the order batches hold them."""
        return {"chosen": self.chosen_ids, "rejected": self.rejected_ids}


@dataclass
class TokenizeSettings:
    max_length: int = 512
    max_prompt_length: int | None = None  # None: half of max_length
    truncation: str = "keep_end"  # which end of an over-long prompt to keep
    max_completion_length: int | None = None  # None: what max_length leaves after the prompt

    def prompt_budget(self) -> int:
        budget = self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2
        return max(1, min(budget, self.max_length - 1))  # leave room for at least one response token


def tokenize_pair(rendered: RenderedPair, tokenizer, settings: TokenizeSettings, index: int,
                  where: str | None = None) -> PreferenceExample:
    """Tokenise a rendered pair: BOS + prompt (truncated per ``settings``) and responses + EOS (unless the chat
    template ended the turn).

    Empty responses are an error (nothing to learn from); over-long responses are cut at the end.
    ``where`` names the pair in errors (default ``row <index>``).
    """
    prompt, responses, prompt_truncated, response_truncated = tokenize_responses(
        rendered.prompt_text, {"chosen": rendered.chosen_text, "rejected": rendered.rejected_text}, tokenizer,
        settings, where or f"row {index}", add_eos=not rendered.ends_turn)
    return PreferenceExample(index, prompt, responses[0], responses[1],
                             prompt_truncated=prompt_truncated, response_truncated=response_truncated)


def tokenize_responses(prompt_text: str, texts: dict[str, str], tokenizer, settings: TokenizeSettings, where: str,
                       add_eos: bool = True):
    """BOS + the prompt, truncated per ``settings``, and each response + EOS (``add_eos``: not after a chat
    template's own end of turn, as TRL), cut at the end to the room left:
    ``(prompt_ids, [response_ids, ...], prompt_truncated, response_truncated)``. An empty response is an error."""
    for column, text in texts.items():
        if not text.strip():
            raise UserError(f"{where}: '{column}' response is empty")
    prompt = encode_text(tokenizer, prompt_text)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not prompt or prompt[0] != bos):
        prompt = [bos] + prompt  # also gives an empty prompt a token for the value head
    budget = settings.prompt_budget()
    prompt_truncated = len(prompt) > budget
    if prompt_truncated:
        prompt = prompt[-budget:] if settings.truncation == "keep_end" else prompt[:budget]

    eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
    room = settings.max_length - len(prompt)
    if settings.max_completion_length is not None:
        room = min(room, settings.max_completion_length)
    responses, response_truncated = [], False
    for text in texts.values():
        ids = encode_text(tokenizer, text) + ([eos] if eos is not None else [])
        response_truncated |= len(ids) > room
        responses.append(ids[:room])
    return prompt, responses, prompt_truncated, response_truncated


def score_pairs(reward, rows: list[dict], rendered: list[RenderedPair], examples: list[PreferenceExample]) -> None:
    """Each pair's auxiliary rewards, chosen and rejected (a ``column:NAME`` reward reads the row's ``NAME``)."""
    prompts = [p.prompt_plain for p in rendered]
    try:
        chosen, rejected = reward.score_pairs(prompts, [p.chosen_plain for p in rendered],
                                              [p.rejected_plain for p in rendered], rows)
    except ValueError as err:  # e.g. a column reward naming a column the data lacks
        first = examples[0].index
        raise UserError(f"auxiliary reward on rows {first}..{first + len(rows) - 1}: {err}") from None
    for example, c, r in zip(examples, chosen.tolist(), rejected.tolist()):
        example.aux_chosen, example.aux_rejected = c, r


def split_train_eval(num_examples: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of example indices; at least one pair stays in training."""
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    num_eval = min(int(math.floor(num_examples * eval_fraction)), num_examples - 1)
    return sorted(order[num_eval:]), sorted(order[:num_eval])
