"""The prompts ``upo-frontier`` completes: the held-out pairs' prompts, then (``--generate-prompts FILE``) questions
without labels, one per line; ``--generate N`` takes the first ``N`` of the two. Each is rendered and tokenised as
``upo-train`` renders a pair's prompt (through the chat template of a chat model), so the reference before the grid
and every run complete the same token ids."""
from __future__ import annotations

from pathlib import Path

from upo.train.data import render_record
from upo.train.data.pairs import TokenizeSettings, is_conversation, tokenize_pair
from upo.train.errors import UserError

PLACEHOLDER = "."  # a response for rendering a prompt alone: its tokens are never read


def load_questions(path: str | Path) -> list[str]:
    """One question per line; blank lines and ``#`` comment lines skipped; refused when there is none."""
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"--generate-prompts {path}: {err.strerror or err}") from None
    questions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not questions:
        raise UserError(f"--generate-prompts {path}: the file holds no question (one per line)")
    return questions


def prompt_rows(held_out_rows: list[dict], questions: list[str], count: int) -> list[dict]:
    """The first ``count`` of: the held-out rows, then a row per question shaped like them (a user message when
    their prompts are conversations, else the plain text)."""
    conversational = bool(held_out_rows) and is_conversation(held_out_rows[0].get("prompt"))
    rows = list(held_out_rows)
    for question in questions:
        if len(rows) >= count:
            break
        prompt = [{"role": "user", "content": question}] if conversational else question
        answer = [{"role": "assistant", "content": PLACEHOLDER}] if conversational else PLACEHOLDER
        rows.append({"prompt": prompt, "chosen": answer, "rejected": answer})
    return rows[:count]


def render_prompts(rows: list[dict], tokenizer, config) -> tuple[list[str], list[list[int]]]:
    """Each row's prompt as plain text (what the rewards read) and as token ids (what the model completes), with
    ``config``'s (a TrainConfig) length settings, exactly as ``upo-train`` tokenises it."""
    settings = TokenizeSettings(config.max_length, config.max_prompt_length, config.truncation,
                                config.max_completion_length)
    plain, ids = [], []
    for i, row in enumerate(rows):
        rendered = render_record(row, tokenizer, f"generation prompt {i}")
        plain.append(rendered.prompt_plain)
        ids.append(tokenize_pair(rendered, tokenizer, settings, i).prompt_ids)
    return plain, ids
