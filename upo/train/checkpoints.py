"""Checkpoint files (``checkpoints/checkpoint-<step>.pt``): naming, finding, resuming, random state."""
from __future__ import annotations

import glob
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from upo.train.atomic import atomic_save
from upo.train.errors import UserError

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


def read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"could not read checkpoint {path}: {str(err).splitlines()[0]}") from None


# Settings that, changed on resume, make the run no longer an exact continuation.
CONTINUATION_SETTINGS = ("dataset", "max_examples", "seed", "batch_size", "grad_accum", "eval_fraction", "max_length",
                         "max_prompt_length", "truncation", "packing", "loss_type", "beta", "lr", "optimizer")


def changed_settings(saved: dict, config) -> list[str]:
    """The :data:`CONTINUATION_SETTINGS` whose value in ``config`` differs from the checkpoint's."""
    return [k for k in CONTINUATION_SETTINGS if k in saved and saved[k] != getattr(config, k)]
