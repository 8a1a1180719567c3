"""Completions for held-out prompts (``--eval-generate N``), scored with the run's auxiliary rewards.

At the end of a run (the final evaluation only, so the cost is bounded by ``N`` prompts times
``--eval-generate-max-tokens``) the policy and the reference complete the prompts of the first
``N`` held-out pairs: greedy by default, sampled with ``--eval-generate-temperature T > 0`` (seeded
by ``--seed``, in a forked random state so training is unaffected). Each completion is scored with
the run's auxiliary rewards (``--aux-reward``; the default ``readability:1.0`` without ``upo``) and
the means are logged as ``eval/generate/*``; the texts go to ``generations.jsonl``.
"""
from __future__ import annotations

import contextlib
import json

import torch
from torch import nn

from upo.train.atomic import atomic_write_text
from upo.train.objective import build_reward

GENERATIONS_FILE = "generations.jsonl"


@torch.no_grad()
def generate_completions(model: nn.Module, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                         temperature: float = 0.0, seed: int = 0, batch_size: int = 8) -> list[list[int]]:
    """The new token ids after each prompt (EOS and padding removed), in batches left-padded to their longest."""
    device = next(model.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = eos if pad is None else pad
    sampling = temperature > 0
    options = dict(max_new_tokens=max_new_tokens, do_sample=sampling, pad_token_id=pad, eos_token_id=eos)
    options.update(dict(temperature=temperature, top_k=0, top_p=1.0) if sampling else
                   dict(temperature=None, top_k=None, top_p=None))
    was_training = model.training
    model.eval()
    completions: list[list[int]] = []
    forked = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if sampling else (
        contextlib.nullcontext())
    try:
        with forked:
            if sampling:
                torch.manual_seed(seed)
            for start in range(0, len(prompt_ids), batch_size):
                chunk = prompt_ids[start:start + batch_size]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
                output = model.generate(input_ids=input_ids, attention_mask=mask, **options)
                for row in output[:, width:].tolist():
                    completions.append(_until_eos(row, eos))
    finally:
        model.train(was_training)
    return completions


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:ids.index(eos)] if eos is not None and eos in ids else ids


def complete_and_score(model: nn.Module, tokenizer, prompt_ids: list[list[int]], prompts: list[str], reward,
                       max_new_tokens: int, temperature: float = 0.0, seed: int = 0, batch_size: int = 8):
    """``(texts, [N, K] unweighted scores, [N] weighted sums)`` of the completions of these prompts."""
    completions = generate_completions(model, tokenizer, prompt_ids, max_new_tokens, temperature, seed, batch_size)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    scores = reward.score_batch(prompts, texts)
    return texts, scores, reward.combine(scores)


def reference_generator(module):
    """A context manager giving the reference as a model that can generate, or None (precomputed, none)."""
    reference = module.reference
    if reference == "adapters":
        @contextlib.contextmanager
        def adapters_off():
            with module.policy.disable_adapter():
                yield module.policy
        return adapters_off()
    if isinstance(reference, nn.Module):
        return contextlib.nullcontext(reference)
    return None


def evaluate_generations(trainer) -> dict[str, float]:
    """``generate/*`` (logged as ``eval/generate/*``) for the first ``--eval-generate`` held-out prompts
    (rank 0 and, under --tp, the other ranks of its model copy; {} elsewhere), and ``generations.jsonl``
    beside the metrics (rank 0)."""
    config = trainer.config
    if trainer.runtime.dp_rank != 0:
        return {}
    indices = trainer.eval_indices[:config.eval_generate]
    if not indices:
        trainer.log("note: --eval-generate: there are no held-out prompts to complete")
        return {}
    reward = trainer.reward or build_reward(config.aux_reward)
    prompts = [trainer.data.plain_texts[i].prompt_plain for i in indices]
    prompt_ids = [trainer.data.examples[i].prompt_ids for i in indices]
    settings = (config.eval_generate_max_tokens, config.eval_generate_temperature, config.seed, config.batch_size)
    results = {"policy": complete_and_score(trainer.module.policy, trainer.tokenizer, prompt_ids, prompts, reward,
                                            *settings)}
    reference = reference_generator(trainer.module)
    if reference is None:
        trainer.log("note: --eval-generate: no reference model is held (--precompute-ref or a reference-free "
                    "loss), so only the policy generates")
    else:
        with reference as model:
            results["reference"] = complete_and_score(model, trainer.tokenizer, prompt_ids, prompts, reward, *settings)
    metrics = {}
    for role, (texts, scores, combined) in results.items():
        metrics[f"generate/aux_reward_{role}"] = float(combined.mean())
        for k, name in enumerate(reward.names):
            metrics[f"generate/{name}/{role}"] = float(scores[:, k].mean())
        metrics[f"generate/chars_{role}"] = sum(map(len, texts)) / len(texts)
    if trainer.runtime.is_main:
        _write_generations(trainer.output_dir / GENERATIONS_FILE, prompts, results)
    return metrics


def _write_generations(path, prompts: list[str], results: dict) -> None:
    lines = []
    for j, prompt in enumerate(prompts):
        record = {"prompt": prompt}
        for role, (texts, _, combined) in results.items():
            record[role] = texts[j]
            record[f"aux_reward_{role}"] = float(combined[j])
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    atomic_write_text("".join(lines), path)
