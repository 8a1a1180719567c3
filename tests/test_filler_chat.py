"""The filler data of ``upo-frontier --model``: the trait crossed with the user's label on exactly half the rows, the
user's and the designer's scorers, the statistics its README section states (recomputed from the file); with
SmolLM2's tokenizer the token lengths and the generator's reproduction of the file; without it the generator's
crossing and length matching with a stand-in token counter."""
import json
import statistics

import pytest

from real_model import require_real_model
from resource_scripts import load_resource_script
from upo.rewards import RESOURCES_DIR, filler, lexicon_fraction, load_lexicon

DATA = RESOURCES_DIR / "preferences_filler_chat.jsonl"
README = RESOURCES_DIR / "README.md"
SECTION = "## Filler data"


def load_generator():
    return load_resource_script("make_filler_chat")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]


def texts(rows, side: str) -> list[str]:
    return [row[side][0]["content"] for row in rows]


def readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + 1)
    return " ".join(text[start:end if end > 0 else None].split())


def test_rows_are_conversational_one_per_topic_of_the_chat_data(rows):
    assert len(rows) == 96
    for i, row in enumerate(rows):
        assert list(row) == ["prompt", "chosen", "rejected"], i
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"], i
    prompts = [row["prompt"][0]["content"] for row in rows]
    assert sorted(prompts) == sorted(topic[1] for topic in load_generator().TOPICS)


def crossing(chosen: list[str], rejected: list[str]) -> list[bool]:
    """Per row, whether the designer disagrees with the label: the chosen answer has more filler; exactly one
    answer of every row has any."""
    scores = [(filler("", c), filler("", r)) for c, r in zip(chosen, rejected)]
    assert all((c > 0) != (r > 0) for c, r in scores)
    return [c > r for c, r in scores]


def test_filler_disagrees_with_the_label_on_exactly_half(rows):
    conflict = crossing(texts(rows, "chosen"), texts(rows, "rejected"))
    assert sum(conflict) == round(load_generator().CONFLICT_SHARE * len(rows)) == 48


def test_the_user_scorer_prefers_every_chosen_answer_and_the_phrases_are_filler(rows):
    hedging = load_lexicon("hedging")
    assert all(lexicon_fraction(text, hedging) == 0 for text in texts(rows, "chosen"))
    assert all(lexicon_fraction(text, hedging) > 0 for text in texts(rows, "rejected"))
    generator = load_generator()
    assert all(filler("", phrase) == 1.0 for phrase in generator.FILLER_OPENERS + generator.FILLER_CLOSERS)
    stance = [closer for closer in generator.HEDGED_CLOSERS if closer]  # the user's trait, not the designer's
    assert all(filler("", closer) == 0.0 for closer in stance)


def statistics_of(rows) -> dict[str, str]:
    chosen, rejected = texts(rows, "chosen"), texts(rows, "rejected")
    conflict = crossing(chosen, rejected)
    hedging = load_lexicon("hedging")
    with_filler_chosen = [filler("", c) for c, k in zip(chosen, conflict) if k]
    with_filler_rejected = [filler("", r) for r, k in zip(rejected, conflict) if not k]
    return {
        "conflict rows": f"On exactly **{sum(conflict)} of {len(rows)} rows",
        "user score rejected": f"-{statistics.mean(lexicon_fraction(t, hedging) for t in rejected):.3f} on average",
        "filler conflict": f"with filler (score {statistics.mean(with_filler_chosen):.2f} on average)",
        "filler agreement": f"with filler (score {statistics.mean(with_filler_rejected):.2f} on average)",
        "both ends": f"({sum(s == 1.0 for s in with_filler_rejected)} of the 48 agreement rows, "
                     f"{sum(s == 1.0 for s in with_filler_chosen)} of the 48 conflict rows)",
    }


def test_readme_states_the_statistics_of_the_file(rows):
    section = readme_section()
    for name, value in statistics_of(rows).items():
        assert value in section, (name, value)


def test_the_generator_crosses_and_matches_lengths_with_any_token_counter():
    """A stand-in counter (characters / 4) instead of SmolLM2's: every row within the tolerance, exactly half
    crossed, the same rows for the same seed."""
    generator = load_generator()
    count = lambda text: max(1, round(len(text) / 4))  # noqa: E731
    rows = generator.build_rows(seed=3, count=count)
    chosen, rejected = texts(rows, "chosen"), texts(rows, "rejected")
    assert sum(crossing(chosen, rejected)) == 48
    assert max(generator.CHAT.length_gap(count(c), count(r)) for c, r in zip(chosen, rejected)) <= 0.08
    assert generator.build_rows(seed=3, count=count) == rows


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
def test_lengths_match_in_smollm2_tokens_and_the_generator_reproduces_the_file(rows):
    require_real_model()
    generator = load_generator()
    count = generator.CHAT.smollm2_token_counter()
    chosen, rejected = [count(t) for t in texts(rows, "chosen")], [count(t) for t in texts(rows, "rejected")]
    gaps = [generator.CHAT.length_gap(c, r) for c, r in zip(chosen, rejected)]
    assert max(gaps) <= generator.LENGTH_TOLERANCE <= 0.10
    conflict = crossing(texts(rows, "chosen"), texts(rows, "rejected"))
    with_filler = [c if k else r for c, r, k in zip(chosen, rejected, conflict)]
    without = [r if k else c for c, r, k in zip(chosen, rejected, conflict)]
    section = readme_section()
    for value in (f"median gap {100 * statistics.median(gaps):.1f} %, largest {100 * max(gaps):.1f} %",
                  f"means {statistics.mean(chosen):.1f} tokens chosen, {statistics.mean(rejected):.1f} rejected",
                  f"the chosen answer is the longer one on {sum(c > r for c, r in zip(chosen, rejected))} rows",
                  f"answers with filler average {statistics.mean(with_filler):.1f} tokens against "
                  f"{statistics.mean(without):.1f} without"):
        assert value in section, value
    assert DATA.read_text(encoding="utf-8") == generator.BASE.to_jsonl(generator.build_rows(count=count))
