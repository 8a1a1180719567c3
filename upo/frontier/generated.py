"""What ``upo-frontier`` measures on what a policy writes: its completions of held-out prompts.

Per run, on the first ``N`` held-out prompts (rendered as in training, through the chat template of a
chat model), greedy unless ``--generate-temperature`` is given (docs/frontier.md defines each):

* ``aux_reward_generated``: the mean designer reward (``--aux-reward``) of the completions;
* ``user_reward_generated``: the mean user reward (``--user-reward``, the same grammar): the user's
  preference as a known scorer, e.g. ``lexicon:hedging:-1`` (the share of hedging words, negated);
* ``length_generated``: the mean number of generated tokens (end-of-turn included when it was written);
* ``degenerate_share_generated``: the share of completions that are empty (no word) or repeat themselves
  (:func:`is_degenerate`);
* ``kl_generated``: the mean over prompts of ``sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)`` over
  the policy's own completion ``y``. Under sampling (``T = 1``) it is an unbiased estimate of
  ``KL(pi || pi_ref)`` on these prompts; under greedy decoding it is the log-ratio of the policy's mode,
  a biased estimate (it can even be negative), kept because it is what the policy writes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from upo.train.generation import generate_completions

DEGENERATE_NGRAM = 3  # words per n-gram
DEGENERATE_REPEAT_SHARE = 0.3  # more than this share of the n-grams are repeats: a degenerate answer


def is_degenerate(text: str, n: int = DEGENERATE_NGRAM, threshold: float = DEGENERATE_REPEAT_SHARE) -> bool:
    """Empty (no word), or more than ``threshold`` of its word ``n``-grams repeat an earlier one.

    Words are the whitespace-separated, lower-cased tokens; an answer of fewer than ``n`` words has no
    ``n``-gram and is degenerate only when empty. ``"yes yes yes yes yes"``: 3 trigrams, 2 repeats -> 0.67.
    """
    words = text.lower().split()
    if not words:
        return True
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return False
    return repeated_share(grams) > threshold


def repeated_share(items: list) -> float:
    """The share of ``items`` equal to an earlier item: ``1 - distinct / total``."""
    return 1.0 - len(set(items)) / len(items)


@torch.no_grad()
def completion_logprob_sums(model: nn.Module, prompt_ids: list[list[int]],
                            completions: list[list[int]]) -> list[float]:
    """``sum_t log p(y_t | x, y_<t)`` of each completion ``y`` after its prompt ``x`` (0.0 for an empty one),
    one sequence at a time (no padding to get wrong)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = []
    try:
        for prompt, completion in zip(prompt_ids, completions):
            if not completion:
                sums.append(0.0)
                continue
            ids = torch.tensor([prompt + completion], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            targets = ids[0, len(prompt):]
            sums.append(float(torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).sum()))
    finally:
        model.train(was_training)
    return sums


@dataclass
class Generations:
    """The completions of one model and what the frontier reads of them."""

    texts: list[str]
    ids: list[list[int]]  # generated tokens, the end-of-turn token included where it was written
    aux_reward: list[float]
    user_reward: list[float]

    def summary(self) -> dict[str, float]:
        count = len(self.texts)
        return {"aux_reward_generated": sum(self.aux_reward) / count,
                "user_reward_generated": sum(self.user_reward) / count,
                "length_generated": sum(map(len, self.ids)) / count,
                "degenerate_share_generated": sum(map(is_degenerate, self.texts)) / count}


def generate(model: nn.Module, tokenizer, prompt_ids: list[list[int]], prompts: list[str], aux_reward, user_reward,
             settings) -> Generations:
    """Complete the prompts (``settings``: :class:`upo.frontier.measure.GenerateSettings`) and score the texts."""
    completions = generate_completions(model, tokenizer, prompt_ids, settings.max_tokens, settings.temperature,
                                       settings.seed, settings.batch_size)
    eos = getattr(tokenizer, "eos_token_id", None)
    # generate_completions cuts at the end-of-turn token: put it back where the model wrote it (before the limit)
    ids = [c + [eos] if eos is not None and len(c) < settings.max_tokens else c for c in completions]
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    aux = aux_reward.combine(aux_reward.score_batch(prompts, texts)).tolist()
    user = user_reward.combine(user_reward.score_batch(prompts, texts)).tolist()
    return Generations(texts, ids, aux, user)


def kl_estimate(policy: nn.Module, reference: nn.Module | None, prompt_ids: list[list[int]],
                generations: Generations) -> float | None:
    """Mean over prompts of ``log pi(y | x) - log pi_ref(y | x)`` on the policy's completions (None: no reference)."""
    if reference is None:
        return None
    policy_sums = completion_logprob_sums(policy, prompt_ids, generations.ids)
    with reference as model:
        reference_sums = completion_logprob_sums(model, prompt_ids, generations.ids)
    return sum(p - r for p, r in zip(policy_sums, reference_sums)) / len(policy_sums)
