"""The bundled preference data: well formed, readable chosen side, reproducible from its generator."""
import json
from pathlib import Path

import pytest

from resource_scripts import load_resource_script
from upo.rewards import RESOURCES_DIR, lexicon, readability

PREFERENCES = RESOURCES_DIR / "preferences.jsonl"
CHAT_SAMPLE = RESOURCES_DIR / "preferences_chat_sample.jsonl"
CONVERSATIONAL = RESOURCES_DIR / "preferences_conversational.jsonl"
FIELDS = ("prompt", "chosen", "rejected")


def read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def load_generator():
    return load_resource_script("make_preferences")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return read_jsonl(PREFERENCES)


def test_file_parses_with_enough_rows(rows):
    assert len(rows) >= 300


def test_rows_have_exactly_three_non_empty_string_fields(rows):
    for i, row in enumerate(rows):
        assert tuple(row) == FIELDS, f"row {i}: keys {list(row)}"
        for field in FIELDS:
            assert isinstance(row[field], str) and row[field].strip(), f"row {i}: empty {field}"
        assert row["chosen"] != row["rejected"], f"row {i}: chosen equals rejected"


def test_no_duplicate_rows_or_prompts(rows):
    triples = [tuple(row[field] for field in FIELDS) for row in rows]
    assert len(set(triples)) == len(triples)
    prompts = [row["prompt"] for row in rows]
    assert len(set(prompts)) == len(prompts)


def test_responses_are_short_for_the_byte_level_default_model(rows):
    assert max(len(row["chosen"]) for row in rows) <= 200
    assert max(len(row["rejected"]) for row in rows) <= 300


def test_chosen_is_more_readable_for_at_least_95_percent(rows):
    wins = [readability(r["prompt"], r["chosen"]) > readability(r["prompt"], r["rejected"]) for r in rows]
    share = sum(wins) / len(wins)
    assert share >= 0.95, f"readability(chosen) > readability(rejected) on only {share:.1%} of rows"


def test_rejected_side_carries_more_jargon(rows):
    more = [lexicon(r["prompt"], r["rejected"]) > lexicon(r["prompt"], r["chosen"]) for r in rows]
    assert sum(more) / len(more) >= 0.95


def test_generator_reproduces_committed_files():
    generator = load_generator()
    assert PREFERENCES.read_text(encoding="utf-8") == generator.to_jsonl(generator.build_rows())
    assert CHAT_SAMPLE.read_text(encoding="utf-8") == generator.to_jsonl(generator.build_chat_rows())
    assert CONVERSATIONAL.read_text(encoding="utf-8") == generator.to_jsonl(generator.conversational(
        generator.build_rows()))


def test_the_conversational_default_is_the_default_as_chat_messages(rows):
    conversational = read_jsonl(CONVERSATIONAL)
    assert len(conversational) == len(rows)
    for row, chat in zip(rows, conversational):
        assert chat == {"prompt": [{"role": "user", "content": row["prompt"]}],
                        "chosen": [{"role": "assistant", "content": row["chosen"]}],
                        "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def test_chat_sample_is_conversational_format():
    rows = read_jsonl(CHAT_SAMPLE)
    assert len(rows) == 10
    for i, row in enumerate(rows):
        assert tuple(row) == FIELDS, f"row {i}"
        for field in FIELDS:
            messages = row[field]
            assert isinstance(messages, list) and messages, f"row {i}: {field}"
            for message in messages:
                assert set(message) == {"role", "content"}, f"row {i}: {field}"
                assert message["role"] in {"system", "user", "assistant"}
                assert isinstance(message["content"], str) and message["content"].strip()
        assert row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"]] == ["assistant"]
        assert [m["role"] for m in row["rejected"]] == ["assistant"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert readability("", chosen) > readability("", rejected), f"row {i}"
