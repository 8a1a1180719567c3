"""The frontier's sampled KL (``--generate-samples``, ``--generate-temperature 1``) against the exact KL of a tiny
Llama with a 5-token vocabulary, found by enumerating every completion of at most 3 tokens (the end-of-turn token
ends one early): the completions come from the frontier's own generate() (left-padded batches, prompts of two
lengths, each repeated), the log-ratios from its completion_logratios()."""
import contextlib
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import one_thread  # noqa: F401  (fixture used by pytestmark)
from upo.frontier.generated import completion_logratios, generate, mean_and_stderr, repeat_each
from upo.frontier.measure import GenerateSettings
from upo.rewards import CombinedReward

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, EOS, MAX_TOKENS = 5, 0, 3
PROMPTS = [[1, 2, 3], [4]]  # two lengths: the shorter one is left-padded in a batch
SAMPLES = 250  # per prompt


class Tokenizer:
    """What generate() reads of a tokenizer: EOS, no padding token (it pads with EOS), decode."""

    eos_token_id, pad_token_id = EOS, None

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return " ".join("abcde"[i] for i in ids if not (skip_special_tokens and i == EOS))


def tiny_model(seed: int) -> LlamaForCausalLM:
    """One layer, wide initial weights, so that two seeds give clearly different distributions."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, initializer_range=0.3,
                         bos_token_id=None, eos_token_id=EOS, pad_token_id=EOS)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def next_token_logprobs(model, ids: list[int]) -> list[float]:
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1).tolist()


def exact_kl(policy, reference, prompt: list[int]) -> float:
    """``sum_y p(y) (log p(y) - log q(y))`` over every completion: EOS ends it (and counts), else 3 tokens."""
    def walk(prefix: list[int], logp: float, logq: float) -> float:
        p_next, q_next = next_token_logprobs(policy, prompt + prefix), next_token_logprobs(reference, prompt + prefix)
        total = 0.0
        for token in range(VOCAB):
            lp, lq = logp + p_next[token], logq + q_next[token]
            if token == EOS or len(prefix) + 1 == MAX_TOKENS:
                total += math.exp(lp) * (lp - lq)
            else:
                total += walk(prefix + [token], lp, lq)
        return total
    return walk([], 0.0, 0.0)


def sampled_logratios(policy, reference, samples: int = SAMPLES) -> list[float]:
    reward = CombinedReward.from_specs(["length:1.0"])
    settings = GenerateSettings(len(PROMPTS), MAX_TOKENS, 1.0, seed=3, batch_size=50, samples=samples)
    texts = [f"q{k}" for k in range(len(PROMPTS))]
    generations = generate(policy, Tokenizer(), PROMPTS, texts, reward, reward, settings)
    assert len(generations.ids) == samples * len(PROMPTS)
    return completion_logratios(policy, contextlib.nullcontext(reference), repeat_each(PROMPTS, samples), generations)


def test_the_sampled_kl_matches_the_exact_kl_of_a_tiny_model():
    policy, reference = tiny_model(0), tiny_model(1)
    exact = sum(exact_kl(policy, reference, prompt) for prompt in PROMPTS) / len(PROMPTS)
    ratios = sampled_logratios(policy, reference)
    estimate, stderr = mean_and_stderr(ratios)
    assert exact > 10 * stderr  # a KL the estimate can tell from 0 (and from a biased estimate)
    assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)


def test_the_exact_kl_of_a_model_against_itself_is_zero_and_so_is_every_sample():
    policy = tiny_model(0)
    assert exact_kl(policy, policy, PROMPTS[0]) == pytest.approx(0.0, abs=1e-12)
    assert max(map(abs, sampled_logratios(policy, policy, samples=10))) < 1e-5


def test_samples_of_a_prompt_sit_next_to_each_other():
    assert repeat_each(["a", "b"], 2) == ["a", "a", "b", "b"]
    assert mean_and_stderr([1.0, 3.0]) == (2.0, 1.0)  # s = sqrt(2), s / sqrt(2) = 1
    assert mean_and_stderr([5.0]) == (5.0, 0.0)
