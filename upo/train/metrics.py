"""Per-step numbers (the loss output flattened, reward means, pair-weighted averages, peak memory),
the ``metrics.jsonl`` log read back on resume, and the run's ``summary.json``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from upo.train.allocator import allocator_in_use


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


def reward_metrics(batch, names: list[str]) -> dict[str, float]:
    """Batch means of each auxiliary reward, unweighted: ``aux/<name>/chosen|rejected`` (unpaired rows:
    over the desirable / undesirable completions, a class absent from the batch left out)."""
    if getattr(batch, "desirable", None) is not None:
        if batch.aux is None:
            return {}
        sides = [(side, batch.aux[rows]) for side, rows in (("chosen", batch.desirable), ("rejected", ~batch.desirable))
                 if bool(rows.any())]
    elif batch.aux_chosen is None:
        return {}
    else:
        sides = [("chosen", batch.aux_chosen), ("rejected", batch.aux_rejected)]
    return {f"aux/{name}/{side}": float(scores[:, k].mean()) for side, scores in sides for k, name in enumerate(names)}


class MetricMean:
    """Example-weighted running means of named metrics (a metric absent from a micro-batch, such as unpaired
    rows' ``rewards/rejected`` without undesirable rows, is averaged over the micro-batches that have it)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, values: dict[str, float], weight: float) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * weight
            self.weights[name] = self.weights.get(name, 0.0) + weight

    def means(self) -> dict[str, float]:
        return {name: total / max(self.weights[name], 1e-12) for name, total in self.sums.items()}

    def all_reduced(self, runtime) -> dict[str, float]:
        """The means over every rank's micro-batches (ranks may hold different metrics)."""
        if not runtime.distributed:
            return self.means()
        import torch.distributed as dist

        gathered: list = [None] * runtime.world_size
        dist.all_gather_object(gathered, sorted(self.sums))
        names = sorted(set().union(*gathered))
        vector = torch.tensor([[self.sums.get(n, 0.0), self.weights.get(n, 0.0)] for n in names], dtype=torch.float64)
        dist.all_reduce(vector)
        return {n: float(total / weight) for n, (total, weight) in zip(names, vector.tolist()) if weight > 0}


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
        "tp": trainer.runtime.tp,
        "output_dir": str(trainer.output_dir),
    }


def describe_run(trainer) -> str:
    """The line a run starts with: model, data, loss, steps, processes."""
    n_params = sum(p.numel() for p in trainer.module.policy.parameters())
    n_train = sum(p.numel() for p in trainer.params) + sum(p.numel() for p in trainer.value_params)
    c = trainer.config
    rows = "unpaired completions" if trainer.unpaired else "pairs"
    return (f"upo-train: {c.model or 'tiny byte-level Llama'} ({n_params:,} params, {n_train:,} trained), "
            f"{len(trainer.train_indices)} train / {len(trainer.eval_indices)} eval {rows}, "
            f"loss {'+'.join(c.loss_type)}, {trainer.total_steps} steps of {c.batch_size}x{c.grad_accum} {rows}, "
            f"{trainer.runtime.world_size} process(es) on {trainer.runtime.device}"
            + (f" ({_copies(trainer.runtime.dp_size)} of --tp {trainer.runtime.tp})" if trainer.runtime.tp > 1 else "")
            + (f", memory allocator {allocator_in_use().describe()}" if trainer.runtime.device.type == "cpu" else ""))


def _copies(n: int) -> str:
    return f"{n} model cop{'y' if n == 1 else 'ies'}"
