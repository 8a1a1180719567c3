"""How UPO's lambda trades preference gain for designer reward, measured exactly on a bandit.

The bandit (tests/bandit.py): 8 prompts x 8 candidate responses, a tabular softmax policy
trained to convergence (L-BFGS, float64) on the full Bradley-Terry population of preference
pairs; designer rewards correlated -0.5 with the true preference utility (they disagree). For
every setting, the policy's optimum is measured:

- ``kept``: the share of the preference gain kept, ``(E_pi[u] - E_ref[u]) / (E_pi0[u] - E_ref[u])``
  with ``pi0`` the optimum at lambda = 0;
- ``accuracy``: the share of candidate pairs the implicit reward ``log pi - log pi_ref`` orders as
  the true utility does;
- ``aux``: the expected designer reward ``E_pi[a]`` (the reference policy's is ``aux_ref``);
- ``length``: the expected response length in tokens;
- ``lambda_half``: the lambda at which half the preference gain is lost (bisection in log lambda).

    python benchmarks/upo_lambda_bandit.py --out benchmarks/results/cpu-DATE-upo-lambda-bandit

writes ``OUT.json`` and ``OUT.md`` (the tables docs/upo_lambda.md cites).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import bandit as B  # noqa: E402

import upo  # noqa: E402

LAMBDAS = [0.0, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
BANDIT = dict(prompts=8, candidates=8, seed=0, correlation=-0.5)


def base(kind: str) -> dict:
    """The preference term: DPO on the pairs, or KTO on the pairs unpaired (TRL's unpairing)."""
    if kind == "dpo":
        return dict(loss_type=["sigmoid", "upo"], paired=True, baseline="pair_mean")
    return dict(loss_type=["kto", "upo"], paired=False, baseline="batch_mean")


def optimum(bandit, kind: str, upo_lambda: float, **options) -> dict:
    settings = base(kind)
    settings.update(options)
    loss_type, paired = settings.pop("loss_type"), settings.pop("paired")
    solved = B.solve(upo, bandit, loss_type, paired=paired, upo_lambda=upo_lambda, **settings)
    return {**B.measures(bandit, solved["logp"]), "grad_norm": solved["grad_norm"]}


def lambda_grid(bandit, kind: str, lambdas=LAMBDAS, **options) -> list[dict]:
    reference = B.measures(bandit, torch.log_softmax(bandit.ref_logits, -1))
    rows = [optimum(bandit, kind, lam, **options) for lam in lambdas]
    gain0 = rows[0]["utility"] - reference["utility"]
    return [{"lambda": lam, "kept": (r["utility"] - reference["utility"]) / gain0, **r}
            for lam, r in zip(lambdas, rows)]


def lambda_half(bandit, kind: str, low=1e-5, high=1e3, steps=11, **options) -> float:
    """Lambda where the preference gain kept crosses 1/2 (geometric bisection)."""
    reference = B.measures(bandit, torch.log_softmax(bandit.ref_logits, -1))["utility"]
    gain0 = optimum(bandit, kind, 0.0, **options)["utility"] - reference
    for _ in range(steps):
        mid = math.sqrt(low * high)
        kept = (optimum(bandit, kind, mid, **options)["utility"] - reference) / gain0
        low, high = (mid, high) if kept > 0.5 else (low, mid)
    return math.sqrt(low * high)


def run() -> dict:
    started = time.time()
    results: dict = {"bandit": BANDIT, "beta": 0.1, "beta_aux": 1.0, "omega_max": 20.0, "aux_normalize": "mean"}
    equal = B.make_bandit(**BANDIT)
    results["aux_ref"] = B.measures(equal, torch.log_softmax(equal.ref_logits, -1))["aux"]
    # 1. the lambda grid, DPO and KTO, one-token responses
    results["grid"] = {kind: lambda_grid(equal, kind) for kind in ("dpo", "kto")}
    # 2. aux_normalize mean vs sum across response lengths: lambda_half
    results["lengths"] = []
    for length in (1, 8, 64):
        b = B.make_bandit(**BANDIT, length=length)
        for kind in ("dpo", "kto"):
            for normalize in ("mean", "sum"):
                results["lengths"].append({"kind": kind, "length": length, "aux_normalize": normalize,
                                           "lambda_half": lambda_half(b, kind, aux_normalize=normalize)})
    # 3. mixed lengths (4, 16 or 64 tokens, independent of u and a): the length bias of "mean"
    mixed = B.make_bandit(**BANDIT, length=(4, 16, 64))
    results["mixed_lengths"] = {normalize: lambda_grid(mixed, "dpo", [0.0, 0.01, 0.1, 1.0, 10.0, 100.0],
                                                       aux_normalize=normalize)
                                for normalize in ("mean", "sum")}
    # 4. beta_aux and omega_max
    results["beta_aux_grid"] = []
    for beta_aux in (0.25, 0.5, 1.0, 2.0, 4.0):
        for omega_max in (20.0, None):
            if omega_max is None and beta_aux > 0.5:
                continue  # the cap of 20 binds only when some A / beta_aux > log 20 ~ 3
            row = {"beta_aux": beta_aux, "omega_max": omega_max,
                   "lambda_half": lambda_half(equal, "dpo", beta_aux=beta_aux, omega_max=omega_max)}
            for lam in (0.1, 10.0):
                row[f"aux@{lam:g}"] = optimum(equal, "dpo", lam, beta_aux=beta_aux, omega_max=omega_max)["aux"]
            results["beta_aux_grid"].append(row)
    # 5. the preference temperature beta
    results["beta_grid"] = [{"beta": beta, "lambda_half": lambda_half(equal, "dpo", beta=beta)}
                            for beta in (0.05, 0.1, 0.3, 1.0)]
    # 6. the learned value baseline (V trained by the expectile loss alone, then held) against the pair mean
    results["baseline_grid"] = []
    for tau in (0.5, 0.7, 0.9):
        values = B.learn_values(upo, equal, True, tau)
        row = {"baseline": f"value (tau {tau:g})",
               "lambda_half": lambda_half(equal, "dpo", baseline="value", values=values)}
        row["aux@10"] = optimum(equal, "dpo", 10.0, baseline="value", values=values)["aux"]
        results["baseline_grid"].append(row)
    results["seconds"] = time.time() - started
    results["machine"] = {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                          "python": platform.python_version(),
                          "torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime())}
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _number(value) -> str:
    return "-" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# UPO lambda on the exact bandit ({m['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']})", "",
             f"Bandit {results['bandit']}, beta {results['beta']}, beta_aux {results['beta_aux']}, omega_max "
             f"{results['omega_max']}, aux_normalize mean; reference policy's designer reward "
             f"{results['aux_ref']:.3f}. {results['seconds']:.0f} s.", ""]
    for kind, rows in results["grid"].items():
        lines += [f"## {kind.upper()} + UPO over lambda (one-token responses)", "",
                  "| lambda | kept | accuracy | aux |", "|---|---|---|---|"]
        lines += [f"| {r['lambda']:g} | {r['kept']:.3f} | {r['accuracy']:.3f} | {r['aux']:.3f} |" for r in rows]
        lines.append("")
    lines += ["## lambda_half by response length and aux_normalize", "",
              "| base | length | mean | sum |", "|---|---|---|---|"]
    table: dict = {}
    for r in results["lengths"]:
        table.setdefault((r["kind"], r["length"]), {})[r["aux_normalize"]] = r["lambda_half"]
    lines += [f"| {kind} | {length} | {v['mean']:.3g} | {v['sum']:.3g} |" for (kind, length), v in table.items()]
    lines += ["", "## Mixed lengths (4 / 16 / 64 tokens), DPO + UPO", "",
              "| lambda | mean: kept | mean: aux | mean: length | sum: kept | sum: aux | sum: length |",
              "|---|---|---|---|---|---|---|"]
    for mean, total in zip(results["mixed_lengths"]["mean"], results["mixed_lengths"]["sum"]):
        lines.append(f"| {mean['lambda']:g} | {mean['kept']:.3f} | {mean['aux']:.3f} | {mean['length']:.1f} | "
                     f"{total['kept']:.3f} | {total['aux']:.3f} | {total['length']:.1f} |")
    lines += ["", "## beta_aux and omega_max, DPO + UPO", "",
              "| beta_aux | omega_max | lambda_half | aux at lambda 0.1 | aux at lambda 10 |", "|---|---|---|---|---|"]
    lines += [f"| {r['beta_aux']:g} | {_number(r['omega_max'])} | {r['lambda_half']:.3g} | {r['aux@0.1']:.3f} | "
              f"{r['aux@10']:.3f} |" for r in results["beta_aux_grid"]]
    lines += ["", "## The preference temperature beta, DPO + UPO", "", "| beta | lambda_half |", "|---|---|"]
    lines += [f"| {r['beta']:g} | {r['lambda_half']:.3g} |" for r in results["beta_grid"]]
    pair_mean = next(r for r in results["beta_aux_grid"] if r["beta_aux"] == 1.0)
    lines += ["", "## The advantage baseline, DPO + UPO", "", "| baseline | lambda_half | aux at lambda 10 |",
              "|---|---|---|", f"| pair_mean | {pair_mean['lambda_half']:.3g} | {pair_mean['aux@10']:.3f} |"]
    lines += [f"| {r['baseline']} | {r['lambda_half']:.3g} | {r['aux@10']:.3f} |" for r in results["baseline_grid"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output path without suffix (.json and .md are written)")
    args = parser.parse_args(argv)
    results = run()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
