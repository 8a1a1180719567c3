"""Generate the conflicting preference data: the user's label and the designer's reward disagree.

    python upo/resources/make_conflict_preferences.py          # rewrites preferences_conflict*.jsonl here
    python upo/resources/make_conflict_preferences.py --seed 1 --out-dir /tmp/x

Each answer has two independent traits:

* register: **plain** (the tips as short sentences) or **technical** (the same tips as one long
  sentence with technical words swapped in, as in ``make_preferences.py``);
* stance: **direct** (the tips stated as facts) or **hedged** (every tip softened, "Maybe ...",
  "I think ...", and a closing "I am not sure, though." or the like).

The user (the label) always prefers the direct answer and does not care about the register; the
designer wants plain language (``upo.rewards.readability``). In a *conflict* pair the chosen
answer is technical and direct and the rejected one plain and hedged: the label and readability
disagree. In an *agreement* pair the chosen answer is plain and direct and the rejected one
technical and hedged. Exactly ``CONFLICT_SHARE`` of the rows are conflict pairs (which ones is
seeded). The topics and tips are those of ``make_preferences.py``. Output is deterministic for
a given seed.
"""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT_NAME = "preferences_conflict.jsonl"
CONVERSATIONAL_NAME = "preferences_conflict_conversational.jsonl"  # the same rows as chat messages
DEFAULT_SEED = 0
ROWS_PER_TOPIC = 4
MAX_ROWS = 360
CONFLICT_SHARE = 0.6  # of the rows: the user-preferred answer is the technical, less readable one
MAX_RESPONSE_CHARS = 300


def _load_base():
    """``make_preferences.py`` (this folder is data, not a package): its topics and jargon table."""
    spec = importlib.util.spec_from_file_location("make_preferences", HERE / "make_preferences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BASE = _load_base()

# Hedges put in front of a plain tip (its first letter lower-cased) and closing sentences; the
# closers are shared by both registers so that the hedged stance reads the same in either.
PLAIN_HEDGES = ["Maybe", "I think you could", "Perhaps", "It might help to", "You could try to", "I guess"]
WHY_PLAIN_HEDGES = ["Maybe", "I think", "Perhaps", "It seems that", "As far as I know,", "I guess"]
CLOSERS = ["I am not sure, though.", "But I could be wrong.", "That is just my guess.", "Do not quote me on that."]
TECHNICAL_HEDGES = ["Possibly,", "Conceivably,", "Presumably,", "It is arguably advisable that"]
HOW_CONNECTORS = [", whereupon one should", ", and subsequently", ", in conjunction with the requirement to",
                  ", while additionally ensuring one is able to"]
WHY_CONNECTORS = [", and additionally", ", whereas concurrently", ", which consequently signifies that",
                  ", in conjunction with the circumstance that"]
HOW_OPENERS = ["Procedurally, one should", "From a technical standpoint, one should", "Methodologically, one should"]
WHY_OPENERS = ["Technically,", "Mechanistically,", "From a physical standpoint,"]


def _lower_first(text: str) -> str:
    return text if text.startswith("I ") else text[0].lower() + text[1:]


def plain(tips: list[str], hedged: bool, kind: str, rng: random.Random) -> str:
    if not hedged:
        return " ".join(tips)
    hedges = PLAIN_HEDGES if kind == "how" else WHY_PLAIN_HEDGES
    softened = [f"{rng.choice(hedges)} {_lower_first(tip)}" for tip in tips]
    return " ".join(softened + [rng.choice(CLOSERS)])


def technical(tips: list[str], hedged: bool, kind: str, rng: random.Random) -> str | None:
    """One long sentence of technical clauses; None when it cannot fit ``MAX_RESPONSE_CHARS``."""
    connectors = HOW_CONNECTORS if kind == "how" else WHY_CONNECTORS
    openers = HOW_OPENERS if kind == "how" else WHY_OPENERS
    clauses = [BASE.jargonize(tip) for tip in tips]
    for _ in range(50):
        body = clauses[0]
        for clause in clauses[1:]:
            body += f"{rng.choice(connectors)} {clause}"
        text = f"{rng.choice(openers)} {body}."
        if hedged:
            hedge = rng.choice(TECHNICAL_HEDGES)
            text = f"{hedge} {_lower_first(text)} {rng.choice(CLOSERS)}"
        if len(text) <= MAX_RESPONSE_CHARS:
            return text
    return None


def pair(tips: list[str], kind: str, conflict: bool, rng: random.Random) -> tuple[str, str] | None:
    """(chosen, rejected): direct beats hedged; the technical side is chosen in a conflict pair."""
    if conflict:
        chosen, rejected = technical(tips, False, kind, rng), plain(tips, True, kind, rng)
    else:
        chosen, rejected = plain(tips, False, kind, rng), technical(tips, True, kind, rng)
    if chosen is None or rejected is None or max(len(chosen), len(rejected)) > MAX_RESPONSE_CHARS:
        return None
    return chosen, rejected


def _topic_slots(rng: random.Random) -> list[tuple[str, str, list[str]]]:
    """(kind, prompt, tip selection): four per topic, prompts and selections as ``make_preferences``."""
    slots = []
    for kind, topics, templates in (("how", BASE.HOW_TOPICS, BASE.HOW_PROMPTS),
                                    ("why", BASE.WHY_TOPICS, BASE.WHY_PROMPTS)):
        for subject, *tips in topics:
            chosen_templates = rng.sample(templates, ROWS_PER_TOPIC)
            for template, selection in zip(chosen_templates, BASE._tip_choices(tuple(tips), rng)):
                slots.append((kind, template.format(subject), selection))
    return slots


def build_rows(seed: int = DEFAULT_SEED) -> list[dict]:
    """``MAX_ROWS`` rows, exactly ``round(CONFLICT_SHARE * MAX_ROWS)`` of them conflict pairs (the
    first ones after a seeded shuffle, then shuffled again); prompts unique."""
    rng = random.Random(seed)
    slots = _topic_slots(rng)
    rng.shuffle(slots)
    slots = slots[:MAX_ROWS]
    conflicts = round(CONFLICT_SHARE * len(slots))
    rows = []
    for number, (kind, prompt, selection) in enumerate(slots):
        conflict = number < conflicts
        texts = pair(selection, kind, conflict, rng)
        if texts is None:  # a triple that cannot fit falls back to its first two tips
            texts = pair(selection[:2], kind, conflict, rng)
        if texts is None:
            raise ValueError(f"no pair under {MAX_RESPONSE_CHARS} characters for {selection}")
        rows.append({"prompt": prompt, "chosen": texts[0], "rejected": texts[1]})
    rng.shuffle(rows)
    prompts = [row["prompt"] for row in rows]
    assert len(set(prompts)) == len(prompts), "prompts must be unique"
    return rows


def main(argv: list[str] | None = None) -> None:
    BASE.write_outputs(argv, __doc__.splitlines()[0], lambda seed: {
        OUTPUT_NAME: build_rows(seed), CONVERSATIONAL_NAME: BASE.conversational(build_rows(seed))})


if __name__ == "__main__":
    main()
