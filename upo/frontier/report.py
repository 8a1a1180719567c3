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
LABEL_OFFSETS = ((6, 5), (6, -11), (-30, 5), (-30, -11))  # per curve, so that coinciding points stay legible


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
        for run, x, y in zip(group, xs, ys):
            ax.annotate(point_label(run), (x, y), textcoords="offset points",
                        xytext=LABEL_OFFSETS[number % len(LABEL_OFFSETS)], fontsize=7,
                        color=colour)
    dataset = report.get("dataset", {})
    ax.set_xlabel(f"designer reward of the preferred response ({', '.join(dataset.get('aux_reward', []))})")
    ax.set_ylabel("preference accuracy (held-out user labels)")
    ax.set_title(f"{Path(str(dataset.get('path', ''))).name}: {dataset.get('eval_pairs', '?')} held-out pairs, "
                 f"{report.get('steps')} steps, seed {report.get('seed')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    save_figure(fig, path, dpi=120)
