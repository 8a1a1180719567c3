"""The conflicting preference data: the label (direct beats hedged) and the designer reward (readability)
disagree on exactly the stated share of the rows; reproducible from its generator; the README's numbers hold."""
import json
import re
import statistics

import pytest

from resource_scripts import load_resource_script
from upo.rewards import RESOURCES_DIR, readability

DATA = RESOURCES_DIR / "preferences_conflict.jsonl"
README = RESOURCES_DIR / "README.md"
FIELDS = ("prompt", "chosen", "rejected")
HEDGED_CLOSERS = ("I am not sure, though.", "But I could be wrong.", "That is just my guess.",
                  "Do not quote me on that.")


def load_generator():
    return load_resource_script("make_conflict_preferences")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]


def test_generator_reproduces_the_committed_file():
    generator = load_generator()
    assert DATA.read_text(encoding="utf-8") == generator.BASE.to_jsonl(generator.build_rows())


def test_the_conversational_file_holds_the_same_rows_as_messages(rows):
    generator = load_generator()
    conversational = RESOURCES_DIR / generator.CONVERSATIONAL_NAME
    assert conversational.read_text(encoding="utf-8") == generator.BASE.to_jsonl(generator.BASE.conversational(rows))


def test_rows_are_well_formed_short_and_unique(rows):
    assert len(rows) == 360
    for i, row in enumerate(rows):
        assert tuple(row) == FIELDS, i
        assert all(isinstance(row[f], str) and row[f].strip() for f in FIELDS), i
        assert max(len(row["chosen"]), len(row["rejected"])) <= 300, i
    assert len({row["prompt"] for row in rows}) == len(rows)


def test_readability_disagrees_with_the_label_on_exactly_the_stated_share(rows):
    generator = load_generator()
    less = [readability(r["prompt"], r["chosen"]) < readability(r["prompt"], r["rejected"]) for r in rows]
    assert sum(less) == round(generator.CONFLICT_SHARE * len(rows)) == 216
    ties = [readability(r["prompt"], r["chosen"]) == readability(r["prompt"], r["rejected"]) for r in rows]
    assert not any(ties)


def test_the_label_follows_the_stance_on_every_row(rows):
    """The learnable preference signal: the chosen answer is never hedged, the rejected one always is."""
    for i, row in enumerate(rows):
        assert not row["chosen"].endswith(HEDGED_CLOSERS), i
        assert row["rejected"].endswith(HEDGED_CLOSERS), i


def statistics_of(rows):
    chosen = [readability(r["prompt"], r["chosen"]) for r in rows]
    rejected = [readability(r["prompt"], r["rejected"]) for r in rows]
    conflict = [c < r for c, r in zip(chosen, rejected)]
    pick = lambda values, keep: [v for v, k in zip(values, conflict) if k == keep]  # noqa: E731
    return {
        "conflict rows": f"{sum(conflict)} of {len(rows)}",
        "readability chosen, conflict": f"{statistics.mean(pick(chosen, True)):.2f}",
        "readability rejected, conflict": f"{statistics.mean(pick(rejected, True)):.2f}",
        "readability chosen, agreement": f"{statistics.mean(pick(chosen, False)):.2f}",
        "readability rejected, agreement": f"{statistics.mean(pick(rejected, False)):.2f}",
        "chars chosen": f"{statistics.mean(len(r['chosen']) for r in rows):.0f}",
        "chars rejected": f"{statistics.mean(len(r['rejected']) for r in rows):.0f}",
    }


def test_readme_states_the_measured_statistics(rows):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Conflicting preference data"):]
    for name, value in statistics_of(rows).items():
        assert re.search(rf"\b{re.escape(value)}\b", section), (name, value)
