"""The prompts ``upo-frontier`` completes: the held-out pairs' and the shipped questions without labels, rendered and
tokenised exactly as ``upo-train`` renders a pair's prompt; the shipped question file."""
import pytest

from upo.frontier.prompts import load_questions, prompt_rows, render_prompts
from upo.rewards import RESOURCES_DIR
from upo.train.config import TrainConfig
from upo.train.data import ByteTokenizer, build_preference_data
from upo.train.data.pairs import TokenizeSettings
from upo.train.errors import UserError

QUESTIONS = RESOURCES_DIR / "frontier_prompts.txt"
CHAT_ROW = {"prompt": [{"role": "user", "content": "Why is the sky blue? " * 9}],
            "chosen": [{"role": "assistant", "content": "Light scatters."}],
            "rejected": [{"role": "assistant", "content": "Maybe light scatters."}]}
PLAIN_ROW = {"prompt": "How do I boil an egg?", "chosen": "Boil it.", "rejected": "Maybe boil it."}


def test_held_out_rows_come_first_then_questions_shaped_like_them():
    rows = prompt_rows([CHAT_ROW], ["How do I X?", "Why Y?"], 2)
    assert rows[0] is CHAT_ROW and rows[1]["prompt"] == [{"role": "user", "content": "How do I X?"}]
    assert len(rows) == 2  # the count cuts the questions
    plain = prompt_rows([PLAIN_ROW], ["How do I X?"], 5)
    assert [row["prompt"] for row in plain] == [PLAIN_ROW["prompt"], "How do I X?"]  # all there is
    assert prompt_rows([CHAT_ROW, PLAIN_ROW], ["Q?"], 1) == [CHAT_ROW]  # held-out pairs alone when enough


@pytest.mark.parametrize("row", [CHAT_ROW, PLAIN_ROW])
def test_prompt_ids_are_the_trainers(row):
    """What build_preference_data (the trainer's data) holds, a long prompt truncated by the same settings."""
    config = TrainConfig(max_length=64, max_prompt_length=40)
    tokenizer = ByteTokenizer()
    plain, ids = render_prompts([row], tokenizer, config)
    settings = TokenizeSettings(config.max_length, config.max_prompt_length, config.truncation,
                                config.max_completion_length)
    data = build_preference_data([row], tokenizer, settings)
    assert ids == [data.examples[0].prompt_ids] and plain == [data.plain_texts[0].prompt_plain]
    if row is CHAT_ROW:
        assert data.examples[0].prompt_truncated and len(ids[0]) == 40


def test_the_shipped_questions_are_new_and_enough_for_60_prompts():
    questions = load_questions(QUESTIONS)
    topics = {line.split("\t")[1] for line in (RESOURCES_DIR / "conflict_chat_topics.tsv").read_text().splitlines()
              if line and not line.startswith("#")}
    assert len(questions) == len(set(questions)) == 48 and not set(questions) & topics
    assert 19 + len(questions) >= 60  # the 19 held-out pairs of the chat data's split, then these
    assert all(q.endswith("?") and (q.startswith("How ") or q.startswith("Why ")) for q in questions)


def test_a_missing_or_empty_question_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="--generate-prompts .*missing.txt: No such file"):
        load_questions(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(UserError, match="holds no question"):
        load_questions(tmp_path / "empty.txt")
