"""The loss registry: what a loss reads (:class:`LossContext`), what it declares (:class:`LossSpec`).

A loss is one function ``fn(ctx) -> (per_pair_loss [B], extra_metrics)`` registered with
:func:`register_loss` in the file of its family (``dpo.py``, ``reference_free.py``, ``kto.py``,
``upo.py``, ``variants.py``). A loss that also reads unpaired rows (``kto``, ``upo``) adds a second
function ``fn(ctx: UnpairedContext) -> (per_example_loss [N], extra_metrics)`` with
:func:`register_unpaired_loss`. The math of every registered loss is in ``docs/losses.md``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from upo.losses.f_divergence import f_scores

__all__ = ["LossContext", "LossSpec", "UnpairedContext", "available_losses", "loss_spec", "register_loss",
           "register_unpaired_loss"]


class _Options:
    """Typed reads of a loss's options (``self.options``, ``self.name``)."""

    name: str
    options: dict[str, Any]

    def float_option(self, key: str, *, positive: bool = False, nonnegative: bool = False) -> float:
        """Option ``key`` as a finite float (``ValueError`` naming the option and the loss otherwise)."""
        value = self.options[key]
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"option {key} of loss {self.name!r} must be a number, got {value!r}") from None
        if not math.isfinite(value) or (positive and value <= 0) or (nonnegative and value < 0):
            bound = " > 0" if positive else " >= 0" if nonnegative else ""
            raise ValueError(f"option {key} of loss {self.name!r} must be finite{bound}, got {value}")
        return value

    def scalar_option(self, key: str, like: Tensor) -> Tensor:
        """A user-given scalar option (float or tensor) as a detached 0-d tensor in ``like``'s dtype."""
        # dtype given up front: a Python float must not pass through float32 on its way to float64.
        try:
            value = torch.as_tensor(self.options[key], dtype=like.dtype, device=like.device).detach()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"option {key} of loss {self.name!r} must be one finite number, "
                             f"got {self.options[key]!r}") from None
        if value.numel() != 1 or not bool(torch.isfinite(value).all()):
            raise ValueError(f"option {key} of loss {self.name!r} must be one finite number, got {self.options[key]!r}")
        return value.reshape(())


@dataclass
class LossContext(_Options):
    """Everything a registered loss may read; tensors are [B] in the compute dtype.

    With ``ld_alpha`` the log-prob sums (policy and reference) are the LD-DPO weighted ones;
    ``unweighted_chosen_logps`` keeps the plain ``S_c`` (TRL's ``sft`` reads it).
    """

    name: str
    chosen_logps: Tensor  # S_c
    rejected_logps: Tensor  # S_r
    ref_chosen_logps: Tensor | None  # R_c
    ref_rejected_logps: Tensor | None  # R_r
    chosen_lengths: Tensor | None  # n_c
    rejected_lengths: Tensor | None  # n_r
    aux_rewards_chosen: Tensor | None  # [B, K], detached
    aux_rewards_rejected: Tensor | None  # [B, K], detached
    values_chosen: Tensor | None  # V(x), keeps its gradient (for the value loss)
    values_rejected: Tensor | None
    beta: float
    label_smoothing: float
    options: dict[str, Any] = field(default_factory=dict)  # this loss's options, defaults filled
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None  # LD-DPO's weight, already applied to the sums above
    unweighted_chosen_logps: Tensor | None = None  # S_c without LD weighting (None: chosen_logps)
    extra_ref_chosen_logps: Tensor | None = None  # [B, K] further reference models (MRPO), detached
    extra_ref_rejected_logps: Tensor | None = None

    @property
    def chosen_logratios(self) -> Tensor:
        return self.chosen_logps - self._require("ref_chosen_logps")

    @property
    def rejected_logratios(self) -> Tensor:
        return self.rejected_logps - self._require("ref_rejected_logps")

    @property
    def margin(self) -> Tensor:
        """h = (S_c - R_c) - (S_r - R_r)."""
        return self.chosen_logratios - self.rejected_logratios

    @property
    def chosen_scores(self) -> Tensor:
        """f'(rho_c) for ``f_divergence_type`` (rho_c itself for the default ``reverse_kl``)."""
        return f_scores(self.chosen_logratios, self.f_divergence_type, self.f_alpha_divergence_coef)

    @property
    def rejected_scores(self) -> Tensor:
        return f_scores(self.rejected_logratios, self.f_divergence_type, self.f_alpha_divergence_coef)

    @property
    def score_margin(self) -> Tensor:
        """d = f'(rho_c) - f'(rho_r): TRL's ``delta_score``, equal to the margin h under ``reverse_kl``."""
        return self.chosen_scores - self.rejected_scores

    @property
    def chosen_mean_logps(self) -> Tensor:
        return self.chosen_logps / self._require("chosen_lengths")

    @property
    def rejected_mean_logps(self) -> Tensor:
        return self.rejected_logps / self._require("rejected_lengths")

    def _require(self, argument: str) -> Tensor:
        value = getattr(self, argument)
        if value is None:
            raise ValueError(f"{argument} is required by loss {self.name!r}")
        return value


@dataclass
class UnpairedContext(_Options):
    """What a loss reads on ``N`` unpaired rows (``upo.unpaired_loss``); tensors are [N] in the compute dtype."""

    name: str
    logps: Tensor  # S
    ref_logps: Tensor | None  # R
    desirable: Tensor  # [N] bool: True for a desirable completion (TRL's label)
    lengths: Tensor | None  # n
    aux_rewards: Tensor | None  # [N, K], detached
    values: Tensor | None  # V(x), keeps its gradient (for the value loss)
    beta: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def logratios(self) -> Tensor:
        if self.ref_logps is None:
            raise ValueError(f"ref_logps is required by loss {self.name!r}")
        return self.logps - self.ref_logps


LossFn = Callable[[LossContext], tuple[Tensor, Mapping[str, Any]]]
NO_METRICS: Mapping[str, Any] = {}


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function and what it needs from the caller."""

    name: str
    fn: LossFn
    needs_reference: bool
    needs_lengths: bool | str  # False, True (both sides) or "chosen"
    needs_aux_rewards: bool
    options: Mapping[str, Any]  # option name -> default
    f_divergence: bool = False  # takes a non-default f_divergence_type (reads the scores, or no reference)
    weighting: bool = True  # takes WPO's per-pair weights (False for the sorting aot losses)
    unpaired_fn: Callable[[UnpairedContext], tuple[Tensor, Mapping[str, Any]]] | None = None  # on unpaired rows


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    needs_reference: bool,
    needs_lengths: bool | str = False,
    needs_aux_rewards: bool = False,
    options: Mapping[str, Any] | None = None,
    aliases: Sequence[str] = (),
    f_divergence: bool = False,
    weighting: bool = True,
) -> Callable[[LossFn], LossFn]:
    """Decorator adding ``fn(ctx) -> (per_pair_loss [B], extra_metrics)`` under ``name``.

    ``options`` declares every option the loss reads with its default; :func:`upo.loss`
    rejects option names no selected loss declares, so typos fail loudly. ``f_divergence``:
    the loss accepts a non-default ``f_divergence_type`` (it reads ``ctx.score_margin`` or the
    scores, or no reference at all); ``weighting=False``: it refuses ``use_weighting`` (WPO).
    """
    if needs_lengths not in (False, True, "chosen"):
        raise ValueError(f"needs_lengths must be False, True or 'chosen', got {needs_lengths!r}")

    def decorator(fn: LossFn) -> LossFn:
        spec = LossSpec(name, fn, needs_reference, needs_lengths, needs_aux_rewards, dict(options or {}),
                        f_divergence, weighting)
        for key in (name, *aliases):
            if key in _REGISTRY:
                raise ValueError(f"loss {key!r} is already registered")
        for key in (name, *aliases):
            _REGISTRY[key] = spec
        return fn

    return decorator


def register_unpaired_loss(name: str) -> Callable:
    """Decorator adding ``fn(ctx: UnpairedContext) -> (per_example_loss [N], extra_metrics)`` to the
    registered loss ``name``: what it computes on unpaired rows (:func:`upo.unpaired_loss`), with the
    same options and needs."""

    def decorator(fn):
        spec = loss_spec(name)
        updated = dataclasses.replace(spec, unpaired_fn=fn)
        for key, value in list(_REGISTRY.items()):
            if value is spec:
                _REGISTRY[key] = updated
        return fn

    return decorator


def available_losses() -> list[str]:
    """Sorted names (aliases included) accepted by ``loss_type``."""
    return sorted(_REGISTRY)


def loss_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` registered under ``name`` (an alias gives its loss's spec).

    Raises ``ValueError`` naming the known losses for an unknown name.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(available_losses())}") from None


def option_readers(key: str) -> list[str]:
    """Names of the registered losses that declare option ``key`` (for error hints)."""
    return sorted({spec.name for spec in _REGISTRY.values() if key in spec.options})
