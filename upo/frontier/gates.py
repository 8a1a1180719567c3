"""The two gates ``upo-frontier`` passes before it compares UPO with relabelling (docs/frontier.md#the-gates).

* **Trait rate**, before any grid: the reference's sampled completions must show the designer's trait (``--trait``:
  a reward spec whose score > 0 marks it) at a rate within ``--trait-rate`` (30 to 70 % with ``--model``). A model
  that never (or always) writes the trait leaves the designer reward no room to move. Fewer than
  ``TRAIT_GATE_MIN_COMPLETIONS`` completions (a quick look) measure no rate worth gating on: not measured.
* **Positive control**, per base loss: relabelling every disagreeing training pair towards the designer
  (``m = 1``) is training on the designer's labels. It must move the designer reward of the generations by more
  than ``CONTROL_SDS`` seed standard deviations above the base loss on the user's labels (``m = 0``, or UPO at
  ``lambda = 0``, which trains the same policy). If it does not, the experiment cannot detect an effect of this
  size and no comparison is made.
"""
from __future__ import annotations

import math

TRAIT_RATE_RANGE = (0.3, 0.7)
TRAIT_GATE_MIN_COMPLETIONS = 20  # below: a rate's standard error exceeds 0.1, the gate is not measured
CONTROL_SDS = 3.0
DESIGNER_MEASURE = "aux_reward_generated"  # what the positive control must move (per run and seed)


def trait_rate(scores: list[float]) -> float:
    """The share of completions whose trait score is > 0."""
    return sum(score > 0 for score in scores) / len(scores)


def trait_rate_gate(scores: list[float], trait: str, low: float, high: float) -> dict:
    """Whether the reference writes the trait at a rate in ``[low, high]`` (``scores``: the trait reward of each
    of its sampled completions); ``passed`` None (not measured) for fewer than ``TRAIT_GATE_MIN_COMPLETIONS``."""
    rate = trait_rate(scores)
    message = (f"the reference writes the trait ({trait} > 0) in {100 * rate:.0f} % of its {len(scores)} sampled "
               "completions")
    result = {"trait": trait, "completions": len(scores), "rate": rate, "range": [low, high]}
    if len(scores) < TRAIT_GATE_MIN_COMPLETIONS:
        return {**result, "passed": None,
                "message": f"{message}: not measured, fewer than {TRAIT_GATE_MIN_COMPLETIONS} completions"}
    passed = low <= rate <= high
    verdict = "within" if passed else "outside"
    return {**result, "passed": passed, "message": f"{message}, {verdict} {100 * low:.0f} to {100 * high:.0f} %"}


def on_user_labels(run: dict, base: str) -> bool:
    """The base loss on the user's own labels: relabelling at ``m = 0``, or UPO at ``lambda = 0``."""
    return run["base"] == base and (run["upo_lambda"] == 0.0 if run["method"] == "upo" else run["relabel_mix"] == 0.0)


def by_seed(runs: list[dict], keep) -> dict[int, dict]:
    """The runs ``keep`` selects, one per seed (the first found: ``m = 0`` and ``lambda = 0`` train the same)."""
    found: dict[int, dict] = {}
    for run in runs:
        if keep(run):
            found.setdefault(run["seed"], run)
    return found


def sample_variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def positive_control_gate(runs: list[dict], base: str, measure: str = DESIGNER_MEASURE) -> dict:
    """Relabelling at ``m = 1`` against the base loss on the user's labels, over the seeds both have: the shift of
    the mean designer reward, and the seed standard deviation (pooled: the root of the mean of the two sample
    variances); passed when ``shift > CONTROL_SDS * sd``."""
    base_runs = by_seed(runs, lambda run: on_user_labels(run, base))
    control_runs = by_seed(runs, lambda run: run["base"] == base and run["method"] == "relabel"
                           and run["relabel_mix"] == 1.0)
    seeds = sorted(set(base_runs) & set(control_runs))
    result = {"base": base, "measure": measure, "seeds": seeds, "sds": CONTROL_SDS, "passed": False}
    base_values = [base_runs[s][measure] for s in seeds if base_runs[s].get(measure) is not None]
    control_values = [control_runs[s][measure] for s in seeds if control_runs[s].get(measure) is not None]
    if len(base_values) < 2 or len(base_values) != len(control_values):
        result["message"] = (f"{base}: not measured: the positive control needs the base loss on the user's labels "
                             "(lambda = 0 or m = 0) and relabelling at m = 1, with their generations, for at least "
                             "2 seeds (the seed noise)")
        return result
    shift = sum(control_values) / len(seeds) - sum(base_values) / len(seeds)
    sd = math.sqrt((sample_variance(base_values) + sample_variance(control_values)) / 2)
    passed = shift > CONTROL_SDS * sd
    result.update(shift=shift, seed_sd=sd, threshold=CONTROL_SDS * sd, passed=passed,
                  base_mean=sum(base_values) / len(seeds), control_mean=sum(control_values) / len(seeds))
    moved = "moved" if passed else "did not move"
    result["message"] = (f"{base}: relabelling at m = 1 {moved} the designer reward by more than {CONTROL_SDS:g} "
                         f"seed standard deviations ({shift:+.4f} against {CONTROL_SDS:g} x {sd:.4f} over "
                         f"{len(seeds)} seeds)")
    return result
