"""The conversational conflict data of ``upo-frontier --model``: its stated statistics recomputed from the file
(the disagreement share, the user's and designer's scores, the length match), and with SmolLM2's tokenizer the
token lengths and the generator's reproduction of the file."""
import json
import re
import statistics

import pytest

from real_model import require_real_model
from resource_scripts import load_resource_script
from upo.rewards import RESOURCES_DIR, lexicon_fraction, load_lexicon, readability

DATA = RESOURCES_DIR / "preferences_conflict_chat.jsonl"
README = RESOURCES_DIR / "README.md"
SECTION = "## Conversational conflict data"


def load_generator():
    return load_resource_script("make_conflict_chat")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]


def texts(rows, side: str) -> list[str]:
    return [row[side][0]["content"] for row in rows]


def gap(a: float, b: float) -> float:
    return abs(a - b) / max(a, b)


def readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    return text[start:text.index("\n## ", start + 1)]


def test_rows_are_conversational_unique_and_one_per_topic(rows):
    assert len(rows) == 96
    for i, row in enumerate(rows):
        assert list(row) == ["prompt", "chosen", "rejected"], i
        assert [m["role"] for m in row["prompt"]] == ["user"], i
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"], i
    prompts = [row["prompt"][0]["content"] for row in rows]
    assert len(set(prompts)) == len(prompts)
    assert {t[1] for t in load_generator().TOPICS} == set(prompts)


def test_readability_disagrees_with_the_label_on_exactly_half(rows):
    chosen = [readability("", text) for text in texts(rows, "chosen")]
    rejected = [readability("", text) for text in texts(rows, "rejected")]
    assert sum(c < r for c, r in zip(chosen, rejected)) == round(load_generator().CONFLICT_SHARE * len(rows)) == 48
    assert not any(c == r for c, r in zip(chosen, rejected))


def test_the_user_scorer_prefers_every_chosen_answer(rows):
    """``lexicon:hedging:-1``: no hedging word in a chosen answer, at least one in every rejected answer."""
    hedging = load_lexicon("hedging")
    assert all(lexicon_fraction(text, hedging) == 0 for text in texts(rows, "chosen"))
    assert all(lexicon_fraction(text, hedging) > 0 for text in texts(rows, "rejected"))
    facts = [fact for topic in load_generator().TOPICS for fact in topic[2:]]
    assert all(lexicon_fraction(fact, hedging) == 0 for fact in facts)  # the hedge is the stance, not the content


def statistics_of(rows) -> dict[str, str]:
    """The README's numbers that need no tokenizer, recomputed from the file."""
    chosen, rejected = texts(rows, "chosen"), texts(rows, "rejected")
    hedging = load_lexicon("hedging")
    conflict = [readability("", c) < readability("", r) for c, r in zip(chosen, rejected)]
    technical = [c if k else r for c, r, k in zip(chosen, rejected, conflict)]
    plain = [r if k else c for c, r, k in zip(chosen, rejected, conflict)]

    def mean_readability(side, keep):
        return f"{statistics.mean(readability('', t) for t, k in zip(side, conflict) if k == keep):.2f}"

    char_gaps = [gap(len(c), len(r)) for c, r in zip(chosen, rejected)]
    return {
        "conflict rows": f"{sum(conflict)} of {len(rows)} rows",
        "user score rejected": f"-{statistics.mean(lexicon_fraction(t, hedging) for t in rejected):.3f}",
        "readability conflict": f"{mean_readability(chosen, True)} / {mean_readability(rejected, True)}",
        "readability agreement": f"{mean_readability(chosen, False)} / {mean_readability(rejected, False)}",
        "technical longer in chars": f"on {sum(len(t) > len(p) for t, p in zip(technical, plain))} of the",
        "char gap": f"median gap {100 * statistics.median(char_gaps):.1f} %, largest {100 * max(char_gaps):.1f} %",
        "chars": f"means {statistics.mean(map(len, chosen)):.0f} characters chosen, "
                 f"{statistics.mean(map(len, rejected)):.0f} rejected",
        "plain longer in words": f"the plain one is the longer in words on "
                                 f"{sum(len(p.split()) > len(t.split()) for t, p in zip(technical, plain))}",
    }


def test_readme_states_the_statistics_of_the_file(rows):
    section = " ".join(readme_section().split())
    for name, value in statistics_of(rows).items():
        assert value in section, (name, value)


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
def test_lengths_match_in_smollm2_tokens_and_the_generator_reproduces_the_file(rows):
    require_real_model()
    generator = load_generator()
    count = generator.smollm2_token_counter()
    chosen = [count(t) for t in texts(rows, "chosen")]
    rejected = [count(t) for t in texts(rows, "rejected")]
    gaps = [gap(c, r) for c, r in zip(chosen, rejected)]
    assert max(gaps) <= generator.LENGTH_TOLERANCE <= 0.10
    section = " ".join(readme_section().split())
    for value in (f"median gap {100 * statistics.median(gaps):.1f} %, largest {100 * max(gaps):.1f} %",
                  f"means {statistics.mean(chosen):.1f} tokens chosen, {statistics.mean(rejected):.1f}",
                  f"the chosen answer is the longer one on {sum(c > r for c, r in zip(chosen, rejected))} rows"):
        assert value in section, value
    assert DATA.read_text(encoding="utf-8") == generator.BASE.to_jsonl(generator.build_rows(count=count))
