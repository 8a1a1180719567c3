"""``frontier.json`` and ``frontier.png``: every run's numbers per seed, their mean and spread over seeds, and
the plot: the user's preference against the designer reward of the generations (with ``--generate``) beside
the ranking diagnostic (preference accuracy against the designer reward of the preferred response)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from upo.train.atomic import atomic_write_text
from upo.train.plot import save_figure

CURVE_STYLES = {  # (method, base) -> colour, marker
    ("upo", "sigmoid"): ("tab:blue", "o"), ("upo", "kto"): ("tab:green", "s"),
    ("relabel", "sigmoid"): ("tab:orange", "^"), ("relabel", "kto"): ("tab:red", "v"),
}
OTHER_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
# Per curve (offset in points, alignment), so that the labels of points that coincide stay apart.
LABEL_OFFSETS = (((7, 6), "left"), ((7, -12), "left"), ((-7, 6), "right"), ((-7, -12), "right"))


# The numbers of a run summarised over seeds (those a run has; None where a seed has none).
SUMMARY_FIELDS = ("preference_accuracy", "aux_reward_preferred", "kl", "aux_reward_generated", "user_reward_generated",
                  "length_generated", "degenerate_share_generated", "kl_generated", "trait_rate_generated",
                  "aux_reward_greedy", "user_reward_greedy", "length_greedy", "degenerate_share_greedy", "kl_greedy",
                  "trait_rate_greedy")


def summarize(runs: list[dict]) -> list[dict]:
    """Per run of the grid (method, base, lambda or mix), over its seeds: ``FIELD`` the mean, ``FIELD_min`` and
    ``FIELD_max`` the spread, ``FIELD_std`` the sample standard deviation (0 with one seed)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["name"], []).append(run)
    summary = []
    for name, group in groups.items():
        first = group[0]
        entry = {"name": name, "method": first["method"], "base": first["base"], "upo_lambda": first["upo_lambda"],
                 "relabel_mix": first["relabel_mix"], "seeds": [run.get("seed") for run in group]}
        for field in SUMMARY_FIELDS:
            values = [run[field] for run in group if run.get(field) is not None]
            if not values:
                continue
            mean = sum(values) / len(values)
            spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            entry.update({field: mean, f"{field}_std": spread, f"{field}_min": min(values),
                          f"{field}_max": max(values)})
        summary.append(entry)
    return summary


def write_json(report: dict, path: Path) -> None:
    atomic_write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", path)


def curves(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs grouped by (method, base), each group ordered by its lambda or mix."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["base"]), []).append(run)
    for key, group in groups.items():
        setting = "upo_lambda" if key[0] == "upo" else "relabel_mix"
        group.sort(key=lambda run: run[setting])
    return groups


def point_label(run: dict) -> str:
    return f"λ={run['upo_lambda']:g}" if run["method"] == "upo" else f"m={run['relabel_mix']:g}"


def coinciding_labels(group: list[dict], x: str = "aux_reward_preferred",
                      y: str = "preference_accuracy") -> dict[tuple[float, float], list[str]]:
    """One label per distinct point of a curve: runs that landed on the same point share it ("m=0.5, m=1")."""
    labels: dict[tuple[float, float], list[str]] = {}
    for run in group:
        point = (round(run[x], 9), round(run[y], 9))
        labels.setdefault(point, []).append(point_label(run))
    return labels


def plot_frontier(report: dict, path: Path) -> None:
    """With generations: the user's preference (y) against the designer reward (x) of what each run writes,
    mean over seeds with the seeds' range as bars, the reference's point marked; beside it, and alone without
    generations, the ranking diagnostic: preference accuracy against the designer reward of the preferred
    response, one curve per method and base, each point labelled with its lambda or mix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report.get("summary") or summarize(report["runs"])
    generated = any(run.get("user_reward_generated") is not None for run in summary)
    fig, axes = plt.subplots(1, 2 if generated else 1, figsize=(13.5 if generated else 7.2, 5.4), squeeze=False)
    if generated:
        _plot_generations(axes[0][0], report, summary)
    _plot_ranking(axes[0][-1], report, summary)
    save_figure(fig, path, dpi=120)


def _styles(summary: list[dict]):
    for number, ((method, base), group) in enumerate(curves(summary).items()):
        colour, marker = CURVE_STYLES.get((method, base), (OTHER_COLOURS[number % len(OTHER_COLOURS)], "D"))
        yield number, method, base, group, colour, marker


def _plot_generations(ax, report: dict, summary: list[dict]) -> None:
    x_field, y_field = "aux_reward_generated", "user_reward_generated"
    for number, method, base, group, colour, marker in _styles(summary):
        xs, ys = [run[x_field] for run in group], [run[y_field] for run in group]
        xerr = [[x - run[f"{x_field}_min"] for x, run in zip(xs, group)],
                [run[f"{x_field}_max"] - x for x, run in zip(xs, group)]]
        yerr = [[y - run[f"{y_field}_min"] for y, run in zip(ys, group)],
                [run[f"{y_field}_max"] - y for y, run in zip(ys, group)]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="-", marker=marker, color=colour, linewidth=1.3, markersize=6,
                    elinewidth=0.8, capsize=2, label=f"{method}-{base}")
        offset, align = LABEL_OFFSETS[number % len(LABEL_OFFSETS)]
        for (x, y), labels in coinciding_labels(group, x_field, y_field).items():
            ax.annotate(", ".join(labels), (x, y), textcoords="offset points", xytext=offset, ha=align, fontsize=7,
                        color=colour)
    for reference in (report.get("generate") or {}).get("reference") or []:
        ax.plot([reference[x_field]], [reference[y_field]], "k*", markersize=11, label="reference (start)")
        break
    dataset = report.get("dataset", {})
    ax.set_xlabel(f"designer reward of the generations ({', '.join(dataset.get('aux_reward', []))})")
    ax.set_ylabel(f"user reward of the generations ({', '.join(report.get('user_reward') or [])})")
    seeds = report.get("seeds") or [report.get("seed")]
    generate = report.get("generate") or {}
    samples = generate.get("samples_per_prompt", 1)
    decoding = f"{samples} sample(s) each at T={generate.get('temperature', 0):g}" if generate.get(
        "temperature") else "greedy"
    ax.set_title(f"what the policy writes: {generate.get('prompts', '?')} held-out prompts, {decoding}; mean and "
                 f"range over {len(seeds)} seed(s)", fontsize=9)
    ax.margins(x=0.1, y=0.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _plot_ranking(ax, report: dict, summary: list[dict]) -> None:
    attainable = report.get("attainable_frontier") or []
    if attainable:
        ax.plot([p["aux_reward_preferred"] for p in attainable], [p["preference_accuracy"] for p in attainable],
                "--", color="0.6", linewidth=1, label="best any ranking of these pairs can do")
    for number, method, base, group, colour, marker in _styles(summary):
        xs = [run["aux_reward_preferred"] for run in group]
        ys = [run["preference_accuracy"] for run in group]
        ax.plot(xs, ys, "-", marker=marker, color=colour, linewidth=1.3, markersize=6, label=f"{method}-{base}")
        for (x, y), labels in coinciding_labels(group).items():
            offset, align = LABEL_OFFSETS[number % len(LABEL_OFFSETS)]
            ax.annotate(", ".join(labels), (x, y), textcoords="offset points", xytext=offset, ha=align,
                        fontsize=7, color=colour)
    dataset = report.get("dataset", {})
    ax.set_xlabel(f"designer reward of the preferred response ({', '.join(dataset.get('aux_reward', []))})")
    ax.set_ylabel("preference accuracy (held-out user labels)")
    seeds = report.get("seeds") or [report.get("seed")]
    ax.set_title(f"{Path(str(dataset.get('path', ''))).name}: {dataset.get('eval_pairs', '?')} held-out pairs, "
                 f"{report.get('steps')} steps, seed{'s' if len(seeds) > 1 else ''} "
                 f"{', '.join(map(str, seeds))}", fontsize=9)
    ax.margins(x=0.1, y=0.06)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
