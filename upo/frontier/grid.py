"""The grid of ``upo-frontier``: which runs, on which split, with which labels.

Every run trains on the same training split with the same seed and steps and is measured on the
same held-out split; only the objective (UPO's ``lambda``) or the training labels (the relabel
mix) change. The held-out labels are never relabelled: they are the user's preference.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from upo.train.errors import UserError

METHODS = ("upo", "relabel")
DEFAULT_METHODS = METHODS
DEFAULT_BASES = ("sigmoid", "kto")
DEFAULT_LAMBDAS = (0.0, 0.3, 1.0, 3.0, 10.0)
DEFAULT_MIXES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class RunSpec:
    """One run: ``method`` ``upo`` (``base`` + UPO's term at ``upo_lambda``) or ``relabel`` (``base`` alone on
    the training pairs relabelled towards the designer reward at ``relabel_mix``)."""

    method: str
    base: str
    upo_lambda: float | None = None
    relabel_mix: float | None = None

    @property
    def name(self) -> str:
        if self.method == "upo":
            return f"upo-{self.base}-lambda{self.upo_lambda:g}"
        return f"relabel-{self.base}-mix{self.relabel_mix:g}"

    @property
    def loss_type(self) -> list[str]:
        return [self.base, "upo"] if self.method == "upo" else [self.base]

    @property
    def label(self) -> str:
        """The point's label in the plot."""
        return f"λ={self.upo_lambda:g}" if self.method == "upo" else f"m={self.relabel_mix:g}"


def parse_names(text: str, flag: str, what: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    """``flag``'s comma-separated list of names, at least one, each once (and each in ``allowed`` when given)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    _refuse_empty(names, flag, f"{what} name")
    if allowed is not None:
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise UserError(f"unknown {what} '{unknown[0]}' (choose from {', '.join(allowed)})")
    _refuse_repeats(names, flag)
    return names


def parse_numbers(text: str, flag: str, low: float, high: float = math.inf) -> list[float]:
    """``flag``'s comma-separated list of finite numbers in ``[low, high]``, at least one, each once."""
    values = []
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"{flag}: '{part}' is not a number (give a comma-separated list, e.g. 0,0.5,1)") from None
        if not (math.isfinite(value) and low <= value <= high):
            bound = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
            raise UserError(f"{flag}: {part} must be a finite number {bound}")
        values.append(value)
    _refuse_empty(values, flag, "number")
    _refuse_repeats(values, flag)
    return values


def _refuse_empty(items: list, flag: str, what: str) -> None:
    """An empty list would drop its part of the grid without a word (``--lambdas ""``: no UPO run at all)."""
    if not items:
        raise UserError(f"{flag} is empty: give at least one {what} (a comma-separated list), or leave the flag "
                        "out for its default")


def _refuse_repeats(items: list, what: str) -> None:
    repeated = sorted({str(item) for item in items if items.count(item) > 1})
    if repeated:
        raise UserError(f"{what} lists {', '.join(repeated)} more than once")


def check_bases(bases: list[str]) -> None:
    """Base losses: registered, not ``upo`` itself, and reading a reference (the implicit reward and the KL
    to the reference need one)."""
    import upo

    known = upo.available_losses()
    for base in bases:
        if base not in known:
            raise UserError(f"unknown base loss '{base}' (available: {', '.join(known)})")
        if base == "upo":
            raise UserError("'upo' is the method, not a base loss: give the preference loss UPO adds to "
                            "(e.g. --bases sigmoid,kto)")
        if not upo.loss_spec(base).needs_reference:
            raise UserError(f"base loss '{base}' uses no reference model; the frontier measures the implicit "
                            "reward and the KL against one (use e.g. sigmoid, ipo or kto)")


def build_grid(methods: list[str], bases: list[str], lambdas: list[float], mixes: list[float]) -> list[RunSpec]:
    """Per base: UPO at every lambda, then relabelling at every mix; refused when it holds no run."""
    runs = []
    for base in bases:
        if "upo" in methods:
            runs += [RunSpec("upo", base, upo_lambda=value) for value in lambdas]
        if "relabel" in methods:
            runs += [RunSpec("relabel", base, relabel_mix=value) for value in mixes]
    if not runs:
        raise UserError("the grid is empty: give at least one method, base and lambda (upo) or mix (relabel)")
    return runs


# ---- data -----------------------------------------------------------------------------------
def disagreeing_pairs(aux_chosen: list[float], aux_rejected: list[float]) -> list[int]:
    """Pairs whose designer reward disagrees with the label: ``r_aux(chosen) < r_aux(rejected)``."""
    return [i for i, (c, r) in enumerate(zip(aux_chosen, aux_rejected)) if c < r]


def relabel(rows: list[dict], aux_chosen: list[float], aux_rejected: list[float], mix: float,
            seed: int) -> tuple[list[dict], list[int]]:
    """The rows with exactly ``round(mix * K)`` of the ``K`` disagreeing pairs swapped (chosen <-> rejected).

    Which ones is a seeded permutation of the disagreeing pairs, the same for every mix, so the
    pairs swapped at a smaller mix are among those swapped at a larger one. Returns the new rows
    and the indices swapped.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    candidates = disagreeing_pairs(aux_chosen, aux_rejected)
    random.Random(seed).shuffle(candidates)
    swapped = sorted(candidates[:round(mix * len(candidates))])
    out = [dict(row) for row in rows]
    for i in swapped:
        out[i]["chosen"], out[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
    return out, swapped


def write_rows(rows: list[dict], path: Path) -> str:
    """The rows as JSONL (what ``upo-train --dataset`` reads); returns the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows),
                    encoding="utf-8")
    return str(path)
