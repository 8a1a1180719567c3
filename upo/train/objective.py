"""The objective of a run: which losses, their fixed options, and the auxiliary rewards UPO reads."""
from __future__ import annotations

from typing import Any

import torch

import upo
from upo import rewards
from upo.train.config import CLASS_WEIGHTED_LOSSES, TrainConfig, flag
from upo.train.errors import UserError


# Settings of the pair losses (their defaults): unpaired rows refuse any other value.
PAIRED_ONLY = {"label_smoothing": 0.0, "f_divergence_type": "reverse_kl", "ld_alpha": None, "use_weighting": False}


def loss_kwargs_from_config(config: TrainConfig, reward_weights: list[float] | None, unpaired: bool = False) -> dict:
    """The ``upo.loss`` (``upo.unpaired_loss``) options that stay fixed over training (UPO's only with ``upo``,
    KTO's class weights only with ``kto`` or ``apo_zero_unpaired``)."""
    kwargs: dict[str, Any] = {
        "loss_type": list(config.loss_type) if len(config.loss_type) > 1 else config.loss_type[0],
        "beta": config.beta,
    }
    if not unpaired:
        kwargs.update({name: getattr(config, name) for name in PAIRED_ONLY},
                      f_alpha_divergence_coef=config.f_alpha_divergence_coef)
    if config.loss_weights is not None:
        kwargs["loss_weights"] = list(config.loss_weights)
    if any(loss in config.loss_type for loss in CLASS_WEIGHTED_LOSSES):
        kwargs.update(desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight)
    if uses_aux_objective(config.loss_type):
        kwargs.update(upo_lambda=config.upo_lambda, beta_aux=config.beta_aux, omega_max=config.omega_max,
                      expectile=config.expectile, baseline=config.baseline, aux_normalize=config.aux_normalize)
        if reward_weights:
            kwargs["aux_weights"] = list(reward_weights)
    return kwargs


def check_loss_options(config: TrainConfig, reward_weights: list[float] | None) -> None:
    """One ``upo.fused_loss`` call on a tiny synthetic batch: bad loss settings (an f-divergence with a loss
    that cannot take it, exo_pair without label smoothing, mrpo's missing references, an option the fused
    path does not feed) become a one-line ``UserError`` before any model or data is loaded."""
    pairs, length, width, vocab = 2, 5, 4, 7
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, length, width, generator=generator)
    labels = torch.full((2 * pairs, length), -100)
    for row in range(2 * pairs):  # responses of different lengths
        labels[row, row % 3:] = torch.randint(0, vocab, (length - row % 3,), generator=generator)
    extra: dict[str, Any] = {}
    if needs_reference(config.loss_type):
        extra["ref_hidden"] = hidden + 0.1 * torch.randn(hidden.shape, generator=generator)
    if uses_aux_objective(config.loss_type):
        columns = len(reward_weights or [1.0])
        extra["aux_rewards_chosen"] = torch.randn(pairs, columns, generator=generator)
        extra["aux_rewards_rejected"] = torch.randn(pairs, columns, generator=generator)
        extra["values_chosen"] = torch.zeros(pairs)
    try:
        upo.fused_loss(hidden, torch.randn(vocab, width, generator=generator), labels, backend="torch",
                       **loss_kwargs_from_config(config, reward_weights), **extra)
    except ValueError as err:
        message = str(err)
        if "extra_ref_chosen_logps" in message:
            message += " (mrpo needs several reference models; upo-train has one: call upo.loss or upo.fused_loss)"
        for flag, needed in (("--use-weighting", "wpo_weights"), ("--ld-alpha", "shared_logps")):
            if needed in message:
                message = f"{flag} needs per-token data that this upo.fused_loss does not compute ({message})"
        raise UserError(f"loss settings: {message}") from None


def check_unpaired_objective(config: TrainConfig, reward_weights: list[float] | None) -> None:
    """Unpaired rows take only the losses that read single completions (kto, upo) and none of the pair
    losses' settings; one ``upo.unpaired_loss`` call on a tiny synthetic batch checks the rest."""
    paired_only = [name for name in config.loss_type if upo.loss_spec(name).unpaired_fn is None]
    if paired_only:
        raise UserError(f"--loss-type {paired_only[0]} compares the two responses of a pair, but the dataset is "
                        "unpaired (prompt/completion/label): use " + " and/or ".join(upo.unpaired_losses()))
    for name, default in PAIRED_ONLY.items():
        if getattr(config, name) != default:
            raise UserError(f"{flag(name)} applies to pairs (prompt/chosen/rejected), but the dataset is unpaired")
    if config.cp > 1:
        raise UserError("--cp splits the rows of pairs (prompt/chosen/rejected); unpaired rows are not split yet: "
                        "drop --cp or use paired data")
    rows = 4
    generator = torch.Generator().manual_seed(0)
    extra: dict[str, Any] = {"kl": 0.0} if "kto" in config.loss_type else {}
    if needs_reference(config.loss_type):
        extra["ref_logps"] = -torch.rand(rows, generator=generator)
    if uses_aux_objective(config.loss_type):
        extra["aux_rewards"] = torch.randn(rows, len(reward_weights or [1.0]), generator=generator)
        if config.baseline == "value":
            extra["values"] = torch.zeros(rows)
    try:
        upo.unpaired_loss(-torch.rand(rows, generator=generator), desirable=[True, False, True, False],
                          lengths=torch.full((rows,), 3.0), **loss_kwargs_from_config(config, reward_weights, True),
                          **extra)
    except ValueError as err:
        message = str(err)
        if "baseline" in message:
            message = f"--baseline {config.baseline} needs pairs: on unpaired data use value or batch_mean"
        raise UserError(f"loss settings: {message}") from None


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


def build_reward(specs: list[str], flag: str = "--aux-reward"):
    """A ``CombinedReward`` from ``name:weight`` / ``column:NAME:weight`` specs (None if no specs); a bad spec is a
    ``UserError`` naming ``flag``."""
    if not specs:
        return None
    try:
        return rewards.CombinedReward.from_specs(list(specs))
    except (KeyError, ValueError, OSError) as err:  # OSError: a lexicon file that is missing or unreadable
        message = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
        raise UserError(f"bad {flag} {' '.join(specs)}: {message}") from None
