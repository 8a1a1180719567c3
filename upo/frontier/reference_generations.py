"""The reference's completions, measured once before the grid, and the trait-rate gate on them (gates.py).

The reference of a run is the model it starts from: the SFT stage's (every run of every seed), ``--model`` itself
without an SFT stage (every seed), or the built-in tiny model from its seed's random weights (one per seed). It is
loaded here as the run would load it and completes the same prompts, with the same settings and the first seed's
sampling, before any run trains.
"""
from __future__ import annotations

import dataclasses

from upo.frontier.gates import trait_rate_gate
from upo.frontier.generated import measure_completions
from upo.frontier.prompts import render_prompts
from upo.frontier.study import Study, run_config
from upo.train.models import load_policy_and_tokenizer


class TraitGateFailed(Exception):
    """The reference writes the designer's trait too rarely or too often: the grid is not run."""


def shared_reference(study: Study) -> bool:
    """Every seed's runs start from the same model: an SFT stage's or ``--model``'s."""
    return study.sft is not None or study.model is not None


def reference_key(study: Study, seed: int) -> int:
    """Where a seed's reference measures are kept: 0 for a shared reference, else the seed."""
    return 0 if shared_reference(study) else seed


def measure_references(study: Study, runtime, log) -> dict | None:
    """Complete the prompts with each reference (one when shared) into ``study.reference_generations``; then the
    trait-rate gate on the first one's completions (None without ``--trait``), kept in ``study.trait_gate``.
    Raises :class:`TraitGateFailed` when the gate fails."""
    if study.generate is None:
        return None
    seeds = study.seeds[:1] if shared_reference(study) else study.seeds
    first_records = None
    for seed in seeds:
        config = run_config(study, study.runs[0], study.eval_path, seed)
        model, tokenizer = load_policy_and_tokenizer(config, runtime.device)
        prompts, prompt_ids = render_prompts(study.prompt_rows, tokenizer, config)
        timings: dict = {}
        metrics, records = measure_completions(model, None, tokenizer, prompts, prompt_ids, study.scorers,
                                               dataclasses.replace(study.generate, seed=seed), timings)
        del model
        study.reference_generations[reference_key(study, seed)] = {
            "seed": seed, **metrics, "generated_examples": [r["completion"] for r in records[:3]],
            "timings": {k: round(v, 2) for k, v in timings.items()}}
        log(f"the reference{'' if shared_reference(study) else f' of seed {seed}'}: {len(records)} completions in "
            f"{sum(timings.values()):.0f} s, designer {metrics['aux_reward_generated']:.3f}, user "
            f"{metrics['user_reward_generated']:.3f}")
        first_records = first_records or records
    if study.scorers.trait is None:
        return None
    scores = [r["trait"] for r in first_records if r["measure"] == "generated"]
    study.trait_gate = trait_rate_gate(scores, ", ".join(study.trait_specs), *study.trait_rate)
    passed = study.trait_gate["passed"]
    log(f"trait-rate gate: {study.trait_gate['message']}" + ("" if passed is None else
                                                              f": {'passed' if passed else 'failed'}"))
    if passed is False:
        raise TraitGateFailed(study.trait_gate["message"])
    return study.trait_gate
