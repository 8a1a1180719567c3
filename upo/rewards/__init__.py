"""Designer rewards ``a_k(x, y)``: auxiliary objectives scored on text before the step.

UPO (docs/losses.md) adds an advantage-weighted term on
``r_aux(x, y) = sum_k w_k * a_k(x, y)``. This package computes the ``a_k`` on CPU, one
float per (prompt, response), without third-party dependencies, and keeps their weights::

    rewards = CombinedReward.from_specs(["readability:1.0", "length:-0.1"])
    scores = rewards.score_batch(prompts, responses, rows)   # float32 [B, K], unweighted
    r_aux = rewards.combine(scores)                          # [B] = scores @ weights
    rewards.names, rewards.weights                           # ["readability", "length"], [1.0, -0.1]

Spec strings (``parse_reward_spec``):

    NAME:WEIGHT              a registered reward (``available_rewards()``)
    column:COLUMN:WEIGHT     a precomputed number in the dataset row (see ``score_batch``)
    lexicon:LIST:WEIGHT      word-list reward with a bundled list name or a path to a file
    filler:WEIGHT            stock openers and closers ("Sure.", "Hope this helps.")

Built-ins and their scales; every one is O(1) on normal text so that
``exp(A / beta_aux)`` stays in a sane range with unit weights:

    readability  Flesch reading ease / 100, floored at -1. Plain prose is ~0.6-1.0,
                 dense technical prose ~0-0.3; the formula's ceiling is ~1.21.
                 Text without words scores 0.0.
    length       whitespace-separated words / 100 (a 50-word answer scores 0.5).
    lexicon      fraction of the response's words found in a word list (0..1). The
                 default list is ``resources/lexicon_jargon.txt``, so give it a negative
                 weight to penalise jargon.
    filler       share of the response's two ends (first and last sentence) that are
                 stock filler (``resources/filler_phrases.txt``): 0, 0.5 or 1. Give it
                 a negative weight to penalise filler.

Only the response is scored by the built-ins; the prompt is passed so that user
callables ``f(prompt, response) -> float`` may use it.

Files: ``text.py`` (word, sentence and syllable counts, Flesch), ``builtin.py`` (the
registry and the built-in rewards), ``filler.py`` (the filler reward and its phrases),
``combined.py`` (spec parsing and :class:`CombinedReward`).
"""
from upo.rewards.builtin import (
    DEFAULT_LEXICON,
    LENGTH_SCALE,
    READABILITY_FLOOR,
    READABILITY_SCALE,
    RESOURCES_DIR,
    RewardFn,
    available_rewards,
    bundled_lexicons,
    get_reward,
    length,
    lexicon,
    lexicon_file,
    lexicon_fraction,
    load_lexicon,
    readability,
    register_reward,
    unregister_reward,
)
from upo.rewards.filler import FILLER_PHRASES_FILE, filler, filler_share, load_filler_phrases
from upo.rewards.combined import (
    SIDES,
    CombinedReward,
    RewardSpec,
    Row,
    parse_reward_spec,
    parse_reward_specs,
)
from upo.rewards.text import count_sentences, count_syllables, flesch_reading_ease, words

__all__ = [
    "DEFAULT_LEXICON", "FILLER_PHRASES_FILE", "LENGTH_SCALE", "READABILITY_FLOOR", "READABILITY_SCALE",
    "RESOURCES_DIR", "SIDES", "CombinedReward", "RewardFn", "RewardSpec", "Row", "available_rewards",
    "bundled_lexicons", "count_sentences", "count_syllables", "filler", "filler_share", "flesch_reading_ease",
    "get_reward", "length", "lexicon", "lexicon_file", "lexicon_fraction", "load_filler_phrases", "load_lexicon",
    "parse_reward_spec", "parse_reward_specs", "readability", "register_reward", "unregister_reward", "words",
]
