"""The objective of a run: which losses, their fixed options, and the auxiliary rewards UPO reads."""
from __future__ import annotations

from typing import Any

import upo
from upo.train.config import TrainConfig
from upo.train.errors import UserError


def loss_kwargs_from_config(config: TrainConfig, reward_weights: list[float] | None) -> dict:
    """The ``upo.loss`` options that stay fixed over training (UPO options only with ``upo``)."""
    kwargs: dict[str, Any] = {
        "loss_type": list(config.loss_type) if len(config.loss_type) > 1 else config.loss_type[0],
        "beta": config.beta,
        "label_smoothing": config.label_smoothing,
    }
    if config.loss_weights is not None:
        kwargs["loss_weights"] = list(config.loss_weights)
    if uses_aux_objective(config.loss_type):
        kwargs.update(upo_lambda=config.upo_lambda, beta_aux=config.beta_aux, omega_max=config.omega_max,
                      expectile=config.expectile, baseline=config.baseline)
        if reward_weights:
            kwargs["aux_weights"] = list(reward_weights)
    return kwargs


def check_loss_names(loss_types: list[str]) -> None:
    known = list(upo.available_losses())
    unknown = [name for name in loss_types if name not in known]
    if unknown:
        raise UserError(f"unknown loss type '{unknown[0]}' (available: {', '.join(known)})")
    if len(set(loss_types)) != len(loss_types):
        raise UserError(f"--loss-type lists a loss twice: {' '.join(loss_types)}")


def uses_aux_objective(loss_types: list[str]) -> bool:
    return "upo" in loss_types


def needs_reference(loss_types: list[str]) -> bool:
    """Whether any selected loss reads reference log-probs (SimPO, ORPO, NLL, UPO alone do not).

    An unknown name counts as needing one (:func:`check_loss_names` reports it first).
    """

    def reads_reference(name: str) -> bool:
        try:
            return upo.loss_spec(name).needs_reference
        except ValueError:
            return True

    return any(reads_reference(name) for name in loss_types)


def build_reward(specs: list[str]):
    """A ``CombinedReward`` from ``name:weight`` / ``column:NAME:weight`` specs (None if no specs)."""
    if not specs:
        return None
    from upo import rewards

    try:
        return rewards.CombinedReward.from_specs(list(specs))
    except (KeyError, ValueError, OSError) as err:  # OSError: a lexicon file that is missing or unreadable
        message = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
        raise UserError(f"bad --aux-reward {' '.join(specs)}: {message}") from None
