"""``frontier.json`` and ``frontier.png``: every run's numbers, and preference accuracy against designer reward."""
from __future__ import annotations

import json
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


def coinciding_labels(group: list[dict]) -> dict[tuple[float, float], list[str]]:
    """One label per distinct point of a curve: runs that landed on the same point share it ("m=0.5, m=1")."""
    labels: dict[tuple[float, float], list[str]] = {}
    for run in group:
        point = (round(run["aux_reward_preferred"], 9), round(run["preference_accuracy"], 9))
        labels.setdefault(point, []).append(point_label(run))
    return labels


def plot_frontier(report: dict, path: Path) -> None:
    """Preference accuracy (y) against the designer reward of the preferred response (x): one curve per
    method and base, each point labelled with its lambda or mix; the attainable frontier dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 5.4))
    attainable = report.get("attainable_frontier") or []
    if attainable:
        ax.plot([p["aux_reward_preferred"] for p in attainable], [p["preference_accuracy"] for p in attainable],
                "--", color="0.6", linewidth=1, label="best any ranking of these pairs can do")
    for number, ((method, base), group) in enumerate(curves(report["runs"]).items()):
        colour, marker = CURVE_STYLES.get((method, base), (OTHER_COLOURS[number % len(OTHER_COLOURS)], "D"))
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
    ax.set_title(f"{Path(str(dataset.get('path', ''))).name}: {dataset.get('eval_pairs', '?')} held-out pairs, "
                 f"{report.get('steps')} steps, seed {report.get('seed')}", fontsize=9)
    ax.margins(x=0.1, y=0.06)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    save_figure(fig, path, dpi=120)
