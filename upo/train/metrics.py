"""Per-step numbers: the loss output flattened, reward means, pair-weighted averages, peak memory."""
from __future__ import annotations

import json
from pathlib import Path

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


def metrics_log_up_to(path: Path, step: int) -> list[dict]:
    """The records of ``metrics.jsonl`` up to ``step``: on resume, later lines belong to lost steps."""
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    return [record for record in records if record.get("step", 0) <= step]
