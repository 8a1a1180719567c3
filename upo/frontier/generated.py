"""What ``upo-frontier`` measures on what a policy writes: its completions of held-out prompts.

Per run, on the first ``N`` held-out prompts (rendered as in training, through the chat template of a
chat model), ``--generate-samples K`` completions per prompt at ``--generate-temperature`` (greedy at 0, where
one completion per prompt is all there is), each measure a mean over the ``N K`` completions
(docs/frontier.md defines each):

* ``aux_reward_generated``: the mean designer reward (``--aux-reward``) of the completions;
* ``user_reward_generated``: the mean user reward (``--user-reward``, the same grammar): the user's
  preference as a known scorer, e.g. ``lexicon:hedging:-1`` (the share of hedging words, negated);
* ``length_generated``: the mean number of generated tokens (end-of-turn included when it was written);
* ``degenerate_share_generated``: the share of completions that are empty (no word) or repeat themselves
  (:func:`is_degenerate`);
* ``kl_generated``: the mean over completions of ``sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)``
  over the policy's own completion ``y``. Sampled at ``T = 1`` it is an unbiased estimate of
  ``KL(pi || pi_ref)`` on these prompts (of completions cut at the token limit; tests/test_sampled_kl.py checks
  it against the exact KL of a tiny model); under greedy decoding it is the log-ratio of the policy's mode,
  a biased estimate (it can even be negative), kept because it is what the policy writes.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from upo.frontier.gates import trait_rate
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
    prompts: list[str] = dataclasses.field(default_factory=list)  # the prompt of each completion

    def summary(self, suffix: str = "generated") -> dict[str, float]:
        count = len(self.texts)
        return {f"aux_reward_{suffix}": sum(self.aux_reward) / count,
                f"user_reward_{suffix}": sum(self.user_reward) / count,
                f"length_{suffix}": sum(map(len, self.ids)) / count,
                f"degenerate_share_{suffix}": sum(map(is_degenerate, self.texts)) / count}


def repeat_each(items: list, times: int) -> list:
    """Each item ``times`` times in a row: ``[a, b], 2 -> [a, a, b, b]``, the order of the completions."""
    return [item for item in items for _ in range(times)]


def generate(model: nn.Module, tokenizer, prompt_ids: list[list[int]], prompts: list[str], aux_reward, user_reward,
             settings) -> Generations:
    """Complete each prompt ``settings.samples`` times, the completions of a prompt next to each other
    (``settings``: :class:`upo.frontier.measure.GenerateSettings`), and score the texts."""
    prompt_ids, prompts = repeat_each(prompt_ids, settings.samples), repeat_each(prompts, settings.samples)
    completions = generate_completions(model, tokenizer, prompt_ids, settings.max_tokens, settings.temperature,
                                       settings.seed, settings.batch_size)
    eos = getattr(tokenizer, "eos_token_id", None)
    # generate_completions cuts at the end-of-turn token: put it back where the model wrote it (before the limit)
    ids = [c + [eos] if eos is not None and len(c) < settings.max_tokens else c for c in completions]
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    aux = aux_reward.combine(aux_reward.score_batch(prompts, texts)).tolist()
    user = user_reward.combine(user_reward.score_batch(prompts, texts)).tolist()
    return Generations(texts, ids, aux, user, prompts)


def completion_logratios(policy: nn.Module, reference, prompt_ids: list[list[int]],
                         generations: Generations) -> list[float] | None:
    """``log pi(y | x) - log pi_ref(y | x)`` of each completion ``y`` of the policy (``prompt_ids``: one per
    completion, as :func:`repeat_each` lays them out); ``reference`` a context manager giving the reference model
    (None: no reference, None returned)."""
    if reference is None:
        return None
    policy_sums = completion_logprob_sums(policy, prompt_ids, generations.ids)
    with reference as model:
        reference_sums = completion_logprob_sums(model, prompt_ids, generations.ids)
    return [p - r for p, r in zip(policy_sums, reference_sums)]


def kl_estimate(policy: nn.Module, reference, prompt_ids: list[list[int]], generations: Generations) -> float | None:
    """Mean over completions of ``log pi(y | x) - log pi_ref(y | x)`` (None: no reference)."""
    ratios = completion_logratios(policy, reference, prompt_ids, generations)
    return None if ratios is None else sum(ratios) / len(ratios)


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error ``s / sqrt(n)`` (``s`` the sample standard deviation; 0 for one value)."""
    count = len(values)
    mean = sum(values) / count
    if count < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (count - 1) / count) ** 0.5


@dataclass
class Scorers:
    """What the completions are scored with: the designer reward, the user reward, and (``--trait``) the trait
    whose score > 0 marks a completion that shows it (None: not measured)."""

    aux: object
    user: object
    trait: object = None


def measure_completions(model: nn.Module, reference_factory, tokenizer, prompts: list[str],
                        prompt_ids: list[list[int]], scorers: Scorers, settings,
                        timings: dict) -> tuple[dict, list[dict]]:
    """The measures of ``model``'s completions and one record per completion (for ``generations.jsonl``).

    ``settings.samples`` completions per prompt at ``settings.temperature`` give the measures (``*_generated``,
    ``kl_generated`` with its standard error, ``trait_rate_generated``); with a temperature > 0, greedy completions of
    the first ``settings.greedy_prompts`` prompts give the diagnostic (``*_greedy``, ``kl_greedy``: the biased
    log-ratio of the mode). ``reference_factory``: a callable giving a fresh context manager that gives the reference
    model, once per pass (a LoRA policy's "adapters off" can be entered once); None: no KL. Seconds spent go to
    ``timings``.
    """
    metrics, records = {}, []
    greedy_count = min(settings.greedy_prompts, len(prompts)) if settings.temperature > 0 else 0
    passes = [("generated", settings, prompts, prompt_ids)]
    if greedy_count:
        greedy = dataclasses.replace(settings, temperature=0.0, samples=1)
        passes.append(("greedy", greedy, prompts[:greedy_count], prompt_ids[:greedy_count]))
    for suffix, pass_settings, pass_prompts, pass_ids in passes:
        clock = time.perf_counter()
        generations = generate(model, tokenizer, pass_ids, pass_prompts, scorers.aux, scorers.user, pass_settings)
        timings[f"generate_{suffix}"] = time.perf_counter() - clock
        clock = time.perf_counter()
        reference = None if reference_factory is None else reference_factory()
        ratios = completion_logratios(model, reference, repeat_each(pass_ids, pass_settings.samples), generations)
        if ratios is not None:
            timings[f"kl_{suffix}"] = time.perf_counter() - clock
        trait = None
        if scorers.trait is not None:
            trait = scorers.trait.combine(scorers.trait.score_batch(generations.prompts, generations.texts)).tolist()
        kl, stderr = mean_and_stderr(ratios) if ratios is not None else (None, None)
        metrics.update({**generations.summary(suffix), f"kl_{suffix}": kl, f"kl_{suffix}_stderr": stderr,
                        f"trait_rate_{suffix}": None if trait is None else trait_rate(trait)})
        temperature = pass_settings.temperature
        decoding = "greedy" if temperature == 0 else f"sampled at temperature {temperature:g}"
        for j, text in enumerate(generations.texts):
            records.append({"prompt": generations.prompts[j], "completion": text, "decoding": decoding,
                            "sample": j % pass_settings.samples, "aux_reward": generations.aux_reward[j],
                            "user_reward": generations.user_reward[j], "trait": None if trait is None else trait[j],
                            "kl": None if ratios is None else ratios[j], "measure": suffix})
    return metrics, records
