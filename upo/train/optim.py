"""The optimiser (AdamW or RMSprop) and the learning-rate schedule (warm-up, then constant, linear or cosine)."""
from __future__ import annotations

import math

import torch

from upo.train.config import TrainConfig


def build_optimizer(params, config: TrainConfig, value_params=()) -> torch.optim.Optimizer:
    """The policy's parameters, and UPO's value head in a group of its own (``--value-lr``,
    ``--value-weight-decay``): a freshly initialised head needs a far larger step than a pretrained policy.
    The schedule scales both groups alike."""
    groups = [{"params": list(params), "lr": config.learning_rate, "weight_decay": config.weight_decay}]
    value_params = list(value_params)
    if value_params:
        groups.append({"params": value_params, "lr": config.value_lr, "weight_decay": config.value_weight_decay})
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    # Fused, as TRL's default (adamw_torch_fused): the step updates in place. Unfused on CPU, torch steps one
    # parameter at a time with temporaries of its size, and the embedding's (113 MB on SmolLM2-135M) set the peak of
    # a whole training step at 1-2k tokens (benchmarks/long_sequence.py). Sharded parameters keep torch's default.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() and type(p.data) is torch.Tensor
                for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused or None)


def build_scheduler(optimizer, config: TrainConfig, total_steps: int):
    warmup = max(0, config.warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if config.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
