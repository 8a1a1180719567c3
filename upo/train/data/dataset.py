"""The dataset ``upo-train`` reads: which format its rows are in (pairs, ``pairs.py``, or unpaired rows,
``unpaired.py``), and every row rendered, tokenised and scored once."""
from __future__ import annotations

from dataclasses import dataclass, field

from upo.train.data.pairs import (
    REQUIRED_COLUMNS,
    PreferenceExample,
    RenderedPair,
    TokenizeSettings,
    is_conversation,
    render_record,
    score_pairs,
    tokenize_pair,
)
from upo.train.data.records import describe_location, describe_locations, locations_of
from upo.train.data.unpaired import (
    UNPAIRED_COLUMNS,
    is_unpaired,
    render_unpaired,
    score_completions,
    tokenize_completion,
)
from upo.train.errors import UserError


def check_columns(records: list[dict]) -> bool:
    """Whether the rows are unpaired (TRL's ``prompt``/``completion``/``label``) rather than pairs; fail with
    the names of the missing columns (``prompt`` may be implicit in paired conversations)."""
    if not records:
        raise UserError("the dataset has no rows")
    first = records[0]
    unpaired = is_unpaired(first)
    missing = [c for c in (UNPAIRED_COLUMNS if unpaired else REQUIRED_COLUMNS) if c not in first]
    if not unpaired and missing == ["prompt"] and is_conversation(first.get("chosen")):
        return False
    if missing:
        found = ", ".join(sorted(first)) or "none"
        raise UserError(f"dataset is missing column(s) {', '.join(missing)} (found: {found}); pairs have "
                        "prompt, chosen, rejected and unpaired rows prompt, completion, label")
    return unpaired


@dataclass
class PreferenceData:
    """Tokenised pairs plus what tokenisation had to do to them."""

    examples: list[PreferenceExample]
    reward_names: list[str] = field(default_factory=list)
    truncated_prompts: int = 0
    truncated_responses: int = 0
    plain_texts: list[RenderedPair] = field(default_factory=list)
    locations: list[tuple[str, str, int]] = field(default_factory=list)  # where each pair's row came from
    unpaired: bool = False  # rows of prompt/completion/label (examples: UnpairedExample)

    def __len__(self) -> int:
        return len(self.examples)

    def where(self, indices: list[int]) -> str:
        """``d.jsonl lines 4, 9``: the source rows of these examples, for messages."""
        locations = self.locations or [("", "row", i) for i in range(len(self.examples))]
        return describe_locations([locations[i] for i in indices])


def build_preference_data(records: list[dict], tokenizer, settings: TokenizeSettings,
                          reward=None, max_examples: int | None = None,
                          reward_batch_size: int = 256) -> PreferenceData:
    """Render, tokenise and (with ``reward``, a ``CombinedReward``) score every record once.

    Rewards are deterministic functions of the texts, so they are computed here, not per step.
    """
    if max_examples is not None:
        records = records.head(max_examples) if hasattr(records, "head") else records[:max_examples]
    unpaired = check_columns(records)
    locations = locations_of(records)
    where = [f"row {i}" + (f" ({describe_location(loc)})" if loc[0] else "") for i, loc in enumerate(locations)]
    if unpaired:
        rendered, labels = zip(*[render_unpaired(r, tokenizer, where[i]) for i, r in enumerate(records)])
        examples = [tokenize_completion(p, labels[i], tokenizer, settings, i, where[i])
                    for i, p in enumerate(rendered)]
        score = score_completions
    else:
        rendered = [render_record(r, tokenizer, where[i]) for i, r in enumerate(records)]
        examples = [tokenize_pair(p, tokenizer, settings, i, where[i]) for i, p in enumerate(rendered)]
        score = score_pairs
    names: list[str] = []
    if reward is not None:
        names = list(reward.names)
        for start in range(0, len(records), reward_batch_size):
            stop = min(start + reward_batch_size, len(records))
            score(reward, records[start:stop], rendered[start:stop], examples[start:stop])
    return PreferenceData(
        examples, names,
        truncated_prompts=sum(e.prompt_truncated for e in examples),
        truncated_responses=sum(e.response_truncated for e in examples),
        plain_texts=list(rendered),
        locations=locations,
        unpaired=unpaired,
    )
