"""Checkpoints (``checkpoints/checkpoint-<step>.pt``): naming, finding, reading, pruning, and a trainer's
state in and out of them (model, optimiser, schedule, data position, random state)."""
from __future__ import annotations

import glob
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from upo.train.atomic import atomic_save, atomic_write_text
from upo.train.data import DataPosition
from upo.train.errors import UserError
from upo.train.metrics import metrics_log_up_to

CHECKPOINT_PATTERN = "checkpoint-*.pt"


def checkpoint_step(path: Path) -> int:
    match = re.search(r"checkpoint-(\d+)\.pt$", str(path))
    return int(match.group(1)) if match else -1


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(glob.glob(str(output_dir / "checkpoints" / CHECKPOINT_PATTERN)),
                   key=lambda p: checkpoint_step(Path(p)))
    return Path(found[-1]) if found else None


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """``auto``: the latest checkpoint in the output dir (or none: a fresh start)."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume).expanduser()
    if path.is_dir():  # an output dir, or its checkpoints/ folder
        found = latest_checkpoint(path) or (latest_checkpoint(path.parent) if path.name == "checkpoints" else None)
        if found is None:
            raise UserError(f"--resume {resume}: no checkpoint in that folder")
        return found
    if not path.is_file():
        raise UserError(f"--resume: checkpoint not found: {resume}")
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module, lora: bool) -> dict:
    """The module's state; with LoRA only the trained tensors (the base is reloaded from --model)."""
    state = model.state_dict()
    if lora:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {name: value for name, value in state.items() if name in trainable}
    return {name: value.detach().cpu().clone() for name, value in state.items()}


def write_checkpoint(payload: dict, output_dir: Path, keep: int) -> Path:
    """``checkpoints/checkpoint-<step>.pt`` written atomically, then all but the newest ``keep`` removed."""
    path = output_dir / "checkpoints" / f"checkpoint-{payload['step']:06d}.pt"
    atomic_save(payload, path)
    found = sorted(glob.glob(str(output_dir / "checkpoints" / CHECKPOINT_PATTERN)),
                   key=lambda p: checkpoint_step(Path(p)))
    for old in found[:-max(1, keep)]:
        os.remove(old)
    return path


def drop_checkpoints_after(output_dir: Path, step: int) -> list[Path]:
    """Remove the checkpoints later than ``step``: resuming from an earlier one abandons them, and a
    later ``--resume auto`` must not pick them up."""
    later = [Path(p) for p in glob.glob(str(output_dir / "checkpoints" / CHECKPOINT_PATTERN))
             if checkpoint_step(Path(p)) > step]
    for path in later:
        os.remove(path)
    return later


CHECKPOINT_KEYS = ("step", "position", "model", "optimizer", "scheduler", "rng")


def read_checkpoint(path: Path) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"could not read checkpoint {path}: {first_line}") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: not written by upo-train, or damaged")
    return checkpoint


# Settings that change neither the trained model nor the data order: changing them on resume is harmless.
BOOKKEEPING_SETTINGS = {"output_dir", "overwrite", "resume", "eval_every", "eval_max_pairs", "save_every",
                        "keep_checkpoints", "max_skipped_batches", "progress", "device"}


def changed_settings(saved: dict, config) -> list[str]:
    """The settings, other than bookkeeping, whose value in ``config`` differs from the checkpoint's."""
    current = config.to_dict()
    return [k for k in current if k in saved and k not in BOOKKEEPING_SETTINGS and saved[k] != current[k]]


# ---- a trainer's state in and out of a checkpoint ------------------------------------------
def training_state_payload(trainer, model_state: dict, optim_state: dict) -> dict:
    """Everything :func:`restore_training_state` needs to continue the run bit for bit."""
    state = trainer.state
    return {
        "step": state.step,
        "position": vars(state.position),
        "tokens_seen": state.tokens_seen,
        "train_seconds": state.train_seconds,
        "skipped_batches": state.skipped_batches,
        "model": model_state,
        "optimizer": optim_state,
        "scheduler": trainer.scheduler.state_dict(),
        "rng": rng_state(),
        "config": trainer.config.to_dict(),
    }


def _first_detail(err: Exception) -> str:
    """The first specific line of a load_state_dict error (``size mismatch for ...``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)


def restore_training_state(trainer, path: Path) -> None:
    """Load a checkpoint into ``trainer`` (model, optimiser, schedule, data position, random state),
    cut ``metrics.jsonl`` back to its step and drop the checkpoints after it (rank 0)."""
    checkpoint = read_checkpoint(path)
    config = trainer.config
    hint = ("resume with the --model, --model-config and --lora settings it was written with (see its "
            "config.json)")
    try:
        if trainer.sharded:  # FSDP, --tp
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(trainer.module, trainer.optimizer, model_state_dict=checkpoint["model"],
                           optim_state_dict=checkpoint["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            _, unexpected = trainer.module.load_state_dict(checkpoint["model"], strict=not config.lora)
            if unexpected:
                raise UserError(f"checkpoint {path} does not fit this model (unexpected: {unexpected[0]}); {hint}")
            trainer.optimizer.load_state_dict(checkpoint["optimizer"])
        trainer.scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        position = DataPosition(**checkpoint["position"])
    except UserError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError) as err:  # shapes, names, a damaged payload
        raise UserError(f"checkpoint {path} does not fit this run: {_first_detail(err)}; {hint}") from None
    changed = changed_settings(checkpoint.get("config", {}), config)
    if changed:  # allowed, but no longer an exact continuation
        trainer.log(f"note: resuming with changed settings ({', '.join(changed)}): "
                    "not an exact continuation of the checkpointed run")
    state = trainer.state
    state.step, state.position = int(checkpoint["step"]), position
    state.tokens_seen = checkpoint.get("tokens_seen", 0)
    state.train_seconds = checkpoint.get("train_seconds", 0.0)
    state.skipped_batches = trainer.guard.skipped = checkpoint.get("skipped_batches", 0)
    trainer.last_checkpoint = (state.step, path)
    metrics_path = trainer.output_dir / "metrics.jsonl"
    trainer.history = metrics_log_up_to(metrics_path, state.step, trainer.log)
    evaluated = [record for record in trainer.history if any(k.startswith("eval/") for k in record)]
    if evaluated:  # the summary reports the last evaluation, as the uninterrupted run's does
        trainer.last_eval = {k[len("eval/"):]: v for k, v in evaluated[-1].items() if k.startswith("eval/")}
    if trainer.runtime.is_main:
        if metrics_path.is_file():
            atomic_write_text("".join(json.dumps(r) + "\n" for r in trainer.history), metrics_path)
        if Path(path).resolve().parent == (trainer.output_dir / "checkpoints").resolve():
            dropped = drop_checkpoints_after(trainer.output_dir, state.step)
            if dropped:
                trainer.log(f"note: removed {len(dropped)} later checkpoint(s) of the abandoned continuation")
    trainer.log(f"resumed from {path} at step {state.step}")
