"""The one number of ``upo-frontier``: UPO's designer reward minus relabelling's at the same user reward and KL.

Per base loss whose positive control passed (gates.py), per seed and per UPO ``lambda > 0``: relabelling's
designer reward is interpolated at UPO's (user reward, KL) from relabelling's own runs of that seed (the base loss
on the user's labels, ``m = 0``, and every mix), linearly (:func:`interpolate`), and subtracted from UPO's. The
number is, per seed, the mean of these differences over the passed bases and lambdas; the report gives its mean and
spread over the seeds. No base passed: no number, and the report says the experiment cannot detect an effect.
"""
from __future__ import annotations

import math

import torch

from upo.frontier.gates import CONTROL_SDS, DESIGNER_MEASURE, on_user_labels, positive_control_gate

USER_MEASURE, KL_MEASURE = "user_reward_generated", "kl_generated"
FLAT = 1e-12  # a coordinate whose spread among relabelling's points is below this is left out of the plane


def interpolate(points: list[tuple[float, float, float]], user: float, kl: float) -> float:
    """The designer reward at ``(user, kl)`` on the least-squares plane ``aux = a + b user + c kl`` through
    ``points`` (``(user, kl, aux)`` each): exact through three points not on a line, linear beyond them. Each
    coordinate is centred and scaled by its spread; one that does not vary among the points is left out, and
    points that cannot fix a plane give its least-norm solution."""
    mean = [sum(point[k] for point in points) / len(points) for k in range(3)]
    columns, query = [], []
    for k, value in ((0, user), (1, kl)):
        spread = math.sqrt(sum((point[k] - mean[k]) ** 2 for point in points))
        if spread > FLAT:
            columns.append([(point[k] - mean[k]) / spread for point in points])
            query.append((value - mean[k]) / spread)
    if not columns:
        return mean[2]
    design = torch.tensor(columns, dtype=torch.float64).T
    target = torch.tensor([[point[2] - mean[2]] for point in points], dtype=torch.float64)
    coefficients = torch.linalg.lstsq(design, target, driver="gelsd").solution[:, 0]
    return mean[2] + float(torch.tensor(query, dtype=torch.float64) @ coefficients)


def relabelling_points(runs: list[dict], base: str, seed: int) -> list[tuple[float, float, float]]:
    """``(user, kl, aux)`` of relabelling's runs of this base and seed, ``m = 0`` (or UPO at ``lambda = 0``) once."""
    chosen = [run for run in runs if run["seed"] == seed and run["base"] == base and run["method"] == "relabel"
              and run["relabel_mix"] != 0.0]
    user_labels = [run for run in runs if run["seed"] == seed and on_user_labels(run, base)]
    return [(run[USER_MEASURE], run[KL_MEASURE], run[DESIGNER_MEASURE]) for run in user_labels[:1] + chosen]


def spread(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": sd, "min": min(values), "max": max(values), "per_seed": values}


def measured(run: dict) -> bool:
    return all(run.get(field) is not None for field in (DESIGNER_MEASURE, USER_MEASURE, KL_MEASURE))


def compare(runs: list[dict], bases: list[str]) -> dict:
    """The positive control of every base, then (for the bases that passed) UPO minus relabelling per lambda and
    the one number; ``verdict`` says it in a sentence."""
    controls = {base: positive_control_gate(runs, base) for base in bases}
    passed = [base for base in bases if controls[base]["passed"]]
    result = {"positive_control": controls, "per_lambda": [], "upo_minus_relabelling": None}
    if not passed:
        result["verdict"] = (f"the experiment cannot detect an effect: relabelling at m = 1 did not move the designer "
                             f"reward by more than {CONTROL_SDS:g} seed standard deviations on any base, so no "
                             "comparison is made")
        return result
    per_seed: dict[int, list[float]] = {}
    for base in passed:
        for lam in sorted({run["upo_lambda"] for run in runs if run["method"] == "upo" and run["base"] == base
                           and run["upo_lambda"] > 0}):
            differences = {}
            for run in runs:
                if run["method"] == "upo" and run["base"] == base and run["upo_lambda"] == lam and measured(run):
                    points = relabelling_points(runs, base, run["seed"])
                    if len(points) >= 2 and all(map(measured_point, points)):
                        at = interpolate(points, run[USER_MEASURE], run[KL_MEASURE])
                        differences[run["seed"]] = run[DESIGNER_MEASURE] - at
            if differences:
                seeds = sorted(differences)
                result["per_lambda"].append({"base": base, "upo_lambda": lam, "seeds": seeds,
                                             **spread([differences[s] for s in seeds])})
                for seed in seeds:
                    per_seed.setdefault(seed, []).append(differences[seed])
    if not per_seed:
        result["verdict"] = ("no comparison: the bases whose positive control passed have no UPO run at lambda > 0 "
                             "with relabelling's runs (m = 0 and a mix) measured on the same seed")
        return result
    seeds = sorted(per_seed)
    number = spread([sum(per_seed[s]) / len(per_seed[s]) for s in seeds])
    result["upo_minus_relabelling"] = {"bases": passed, "seeds": seeds, **number}
    result["verdict"] = (f"UPO's designer reward minus relabelling's at the same user reward and KL: "
                         f"{number['mean']:+.4f} (seed std {number['std']:.4f}, {number['min']:+.4f} to "
                         f"{number['max']:+.4f} over {len(seeds)} seeds; bases {', '.join(passed)})")
    return result


def measured_point(point: tuple[float, float, float]) -> bool:
    return all(value is not None for value in point)
