"""Per-step numbers (the loss output flattened, reward means, pair-weighted averages, peak memory),
the ``metrics.jsonl`` log read back on resume, and the run's ``summary.json``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from upo.train.data import PreferenceBatch


def scalar_metrics(out) -> dict[str, float]:
    """Flatten a ``LossOutput`` into named floats: total loss, each term, each metric."""
    values = {"loss": _to_float(out.loss)}
    for name, value in (getattr(out, "terms", None) or {}).items():
        values[f"loss/{name}"] = _to_float(value)
    for name, value in (getattr(out, "metrics", None) or {}).items():
        number = _to_float(value)
        if number is not None:
            values[name] = number
    return {k: v for k, v in values.items() if v is not None}


def _to_float(value) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean()) if value.numel() else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def reward_metrics(batch: PreferenceBatch, names: list[str]) -> dict[str, float]:
    """Batch means of each auxiliary reward, unweighted: ``aux/<name>/chosen|rejected``."""
    if batch.aux_chosen is None:
        return {}
    values = {}
    for k, name in enumerate(names):
        values[f"aux/{name}/chosen"] = float(batch.aux_chosen[:, k].mean())
        values[f"aux/{name}/rejected"] = float(batch.aux_rejected[:, k].mean())
    return values


class MetricMean:
    """Pair-weighted running means of named metrics."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, values: dict[str, float], weight: float) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.weight += weight

    def means(self) -> dict[str, float]:
        return {name: total / max(self.weight, 1e-12) for name, total in self.sums.items()}


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA ``max_memory_allocated``, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except ImportError:  # not Unix
        return 0


POSTFIX_KEYS = (("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
                ("eval/rewards/accuracies", "eval_acc"))


def postfix(record: dict) -> dict:
    """The progress bar's live numbers."""
    return {label: f"{record[key]:.3f}" for key, label in POSTFIX_KEYS if key in record}


def metrics_log_up_to(path: Path, step: int, log=None) -> list[dict]:
    """The records of ``metrics.jsonl`` up to ``step``: on resume, later lines belong to lost steps.

    A run killed while writing leaves a half line at the end; it (and any other line that is not
    a record) is dropped, with a note naming it, rather than failing the resume.
    """
    if not path.is_file():
        return []
    by_step, broken = {}, []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                broken.append(number)
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                by_step[record["step"]] = record  # a step logged twice: its last record
    if broken and log is not None:
        log(f"note: {path}: dropped unreadable line(s) {', '.join(map(str, broken))} (a write cut short)")
    return [by_step[s] for s in sorted(by_step)]


def run_summary(trainer) -> dict:
    """``summary.json``: the run's size, truncation, skipped batches, last-10-step means, last eval, speed."""
    history, state = trainer.history, trainer.state
    last = history[-1] if history else {}
    bookkeeping = {"step", "epoch", "tokens", "lr", "peak_memory_bytes"}
    train_keys = [k for k in last if not k.startswith("eval/") and k not in bookkeeping]
    recent = history[-10:]
    smoothed = {k: float(np.mean([r[k] for r in recent if k in r])) for k in train_keys
                if isinstance(last.get(k), (int, float))}
    return {
        "steps": state.step,
        "skipped_batches": state.skipped_batches,
        "epochs": state.position.epoch + state.position.index / max(1, len(trainer.train_indices)),
        "train_pairs": len(trainer.train_indices),
        "eval_pairs": len(trainer.eval_indices),
        "truncated_prompts": trainer.data.truncated_prompts,
        "truncated_responses": trainer.data.truncated_responses,
        "aux_rewards": trainer.data.reward_names,
        "first_loss": history[0]["loss"] if history else None,
        "train": smoothed,  # mean of the last 10 steps
        "eval": trainer.last_eval,
        "tokens_seen": state.tokens_seen,
        "train_seconds": state.train_seconds,
        "tokens_per_s": state.tokens_seen / max(state.train_seconds, 1e-9),
        "peak_memory_bytes": peak_memory_bytes(trainer.runtime.device),
        "world_size": trainer.runtime.world_size,
        "output_dir": str(trainer.output_dir),
    }
