"""Preference-alignment losses over per-sequence log-probabilities (DESIGN.md section 1).

Every loss here only needs, per pair ``i`` of a batch of ``B`` pairs, the summed response
log-probs of the policy ``S_c, S_r`` (chosen, rejected), optionally the reference model's
``R_c, R_r``, the response token counts ``n_c, n_r`` and designer rewards. The heavy work
(log-probs without logits) is done elsewhere; this module is plain autograd over ``[B]``
vectors, so its gradient gives one coefficient per sequence.

Notation: ``rho = S - R`` (log-ratio), ``h = rho_c - rho_r`` (margin), ``Sbar = S / n``,
``eps`` = ``label_smoothing``, ``sig`` = sigmoid, ``ls`` = log-sigmoid. Per-pair losses:

=============  ============================================================================
sigmoid        ``-(1-eps) ls(beta h) - eps ls(-beta h)``                         (DPO)
robust         ``(-(1-eps) ls(beta h) + eps ls(-beta h)) / (1 - 2 eps)``        (rDPO)
hinge          ``relu(1 - beta h)``                                         (SLiC / RSO)
ipo            ``(h_avg - 1/(2 beta))^2``, ``h_avg = rho_c/n_c - rho_r/n_r``      (lengths)
exo_pair       ``sig(bh)(ls(bh) - log(1-eps)) + sig(-bh)(ls(-bh) - log eps)``, ``bh = beta h``;
               eps = 1e-3 when label_smoothing is 0 (EXO paper / TRL 0.x default)
nca_pair       ``-ls(beta rho_c) - ls(-beta rho_c)/2 - ls(-beta rho_r)/2``
bco_pair       ``-ls(beta rho_c - delta) - ls(-(beta rho_r - delta))``; ``delta`` = option
               ``bco_delta``, default the detached batch mean of the 2B rewards ``beta rho``
               (TRL 0.x keeps a running mean of that quantity; TRL >= 1.0 uses delta = 0)
sppo_hard      ``(rho_c - 1/(2 beta))^2 + (rho_r + 1/(2 beta))^2``
apo_zero       ``1 - sig(beta rho_c) + sig(beta rho_r)``
apo_down       ``sig(beta rho_c) + 1 - sig(beta h)``
discopop       ``(1 - m) (-ls(beta h)) + m exp(-beta h)``, ``m = sig(beta h / tau)``,
               tau = option ``discopop_tau`` (0.05)
simpo          ``-(1-eps) ls(beta (Sbar_c - Sbar_r) - gamma) - eps ls(-(...))``; no reference;
               ``gamma`` is the absolute margin (= TRL ``CPOConfig.simpo_gamma``, default 0.5),
               or give ``gamma_beta_ratio`` (SimPO repo style, gamma = ratio * beta)
orpo           ``-Sbar_c - lambda ls(log_odds)``, ``log_odds = (Sbar_c - Sbar_r)
               - (log(1 - exp Sbar_c) - log(1 - exp Sbar_r))``; no reference;
               lambda = option ``orpo_lambda``, default ``beta`` (as TRL's ORPOTrainer);
               ``Sbar`` is capped at -1e-6 inside the log-odds (undefined at probability 1)
kto            ``(w_d (1 - sig(beta (rho_c - z))) + w_u (1 - sig(beta (z - rho_r)))) / 2``;
               paired data (desirable = chosen, undesirable = rejected), so the batch mean
               is TRL's mean over the 2B examples; ``z`` = option ``kl`` (used as given),
               default the detached mean over the 2B responses of ``rho``, clamped at 0
nll (rpo)      ``alpha * (-Sbar_c)``, alpha = option ``alpha`` (1.0); meant to be combined.
               Here and in orpo the NLL is each response's token mean, averaged over pairs;
               TRL takes the token mean over the whole batch (equal for equal lengths)
upo            ``lambda * (-(omega_c X_c + omega_r X_r) / 2) + (e(u_c) + e(u_r)) / 2``:
               ``X = Sbar`` (``aux_normalize="mean"``) or ``S`` (``"sum"``),
               ``r_aux = sum_k w_k a_k``, ``A = r_aux - V`` (V detached),
               ``omega = min(exp(A / beta_aux), omega_max)`` without gradient,
               ``e(u) = |tau - 1[u < 0]| u^2`` with ``u = r_aux - V`` (trains V only; zero
               without ``values_*``). The batch mean is ``lambda * L_aux + L_V``.
               Options: ``upo_lambda`` (1), ``beta_aux`` (1), ``omega_max`` (20),
               ``expectile`` tau (0.7), ``aux_weights`` w (ones, one per column of the
               ``[B, K]`` rewards), ``baseline`` V (``"value"`` when ``values_*`` are given,
               else ``"pair_mean"``; or ``"batch_mean"``), ``aux_normalize`` (``"mean"``)
=============  ============================================================================

Terms combine by weight: ``loss(..., loss_type=["sigmoid", "upo"], loss_weights=[1, 0.5])``.
Reward metrics are ``beta * (S - R)`` with a reference; without one ``beta * Sbar`` when
lengths are given (TRL's CPO-simpo / ORPO log averaged log-probs) and ``beta * S`` otherwise.

:class:`ValueHead` is the small learned ``V(x)`` for the UPO baseline.

Adding a loss is one small function of a :class:`LossContext`, registered with
:func:`register_loss`, returning a ``[B]`` per-pair loss and a dict of extra metrics.
:func:`loss_spec` gives a registered loss's :class:`LossSpec` (what it needs, option defaults).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LossContext",
    "LossOutput",
    "LossSpec",
    "ValueHead",
    "available_losses",
    "loss",
    "loss_spec",
    "register_loss",
]


# --------------------------------------------------------------------------- containers
@dataclass
class LossOutput:
    """Result of :func:`loss`."""

    loss: Tensor  # scalar, mean over pairs of ``losses``
    losses: Tensor  # [B] weighted sum of the terms per pair
    terms: dict[str, Tensor]  # each term's batch mean before weighting
    metrics: dict[str, float]  # rewards/*, logps/*, per-term extras


@dataclass
class LossContext:
    """Everything a registered loss may read; tensors are [B] in the compute dtype."""

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


LossFn = Callable[[LossContext], tuple[Tensor, Mapping[str, Any]]]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function and what it needs from the caller."""

    name: str
    fn: LossFn
    needs_reference: bool
    needs_lengths: bool | str  # False, True (both sides) or "chosen"
    needs_aux_rewards: bool
    options: Mapping[str, Any]  # option name -> default


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    needs_reference: bool,
    needs_lengths: bool | str = False,
    needs_aux_rewards: bool = False,
    options: Mapping[str, Any] | None = None,
    aliases: Sequence[str] = (),
) -> Callable[[LossFn], LossFn]:
    """Decorator adding ``fn(ctx) -> (per_pair_loss [B], extra_metrics)`` under ``name``.

    ``options`` declares every option the loss reads with its default; :func:`loss`
    rejects option names no selected loss declares, so typos fail loudly.
    """
    if needs_lengths not in (False, True, "chosen"):
        raise ValueError(f"needs_lengths must be False, True or 'chosen', got {needs_lengths!r}")

    def decorator(fn: LossFn) -> LossFn:
        spec = LossSpec(name, fn, needs_reference, needs_lengths, needs_aux_rewards, dict(options or {}))
        for key in (name, *aliases):
            if key in _REGISTRY:
                raise ValueError(f"loss {key!r} is already registered")
        for key in (name, *aliases):
            _REGISTRY[key] = spec
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


# --------------------------------------------------------------------------- entry point
def loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    aux_rewards_chosen: Tensor | None = None,
    aux_rewards_rejected: Tensor | None = None,
    values_chosen: Tensor | None = None,
    values_rejected: Tensor | None = None,
    **options: Any,
) -> LossOutput:
    """Weighted sum of preference losses over a batch of B pairs (formulas: module docstring).

    All per-pair inputs are ``[B]`` (aux rewards ``[B]`` or ``[B, K]``); ``**options`` are
    the per-loss options, each checked against the options the selected losses declare.
    Raises ``ValueError`` naming the offending argument for any malformed input.
    """
    names, weights = _resolve_loss_types(loss_type, loss_weights)
    specs = [loss_spec(name) for name in names]
    _check_options(options, names, specs)
    beta, label_smoothing = _check_hyperparameters(beta, label_smoothing)

    dtype = _compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    batch = _batch_size(policy_chosen_logps)
    device = policy_chosen_logps.device
    vector = _VectorChecker(batch, dtype, device)

    chosen_logps = vector.logps(policy_chosen_logps, "policy_chosen_logps")
    rejected_logps = vector.logps(policy_rejected_logps, "policy_rejected_logps")
    ref_chosen = vector.optional_logps(ref_chosen_logps, "ref_chosen_logps")
    ref_rejected = vector.optional_logps(ref_rejected_logps, "ref_rejected_logps")
    if (ref_chosen is None) != (ref_rejected is None):
        missing = "ref_chosen_logps" if ref_chosen is None else "ref_rejected_logps"
        raise ValueError(f"{missing} is missing: give reference log-probs for both chosen and rejected, or neither")
    n_chosen = vector.lengths(chosen_lengths, "chosen_lengths")
    n_rejected = vector.lengths(rejected_lengths, "rejected_lengths")
    aux_chosen, aux_rejected = vector.aux_rewards(aux_rewards_chosen, aux_rewards_rejected)
    v_chosen = vector.values(values_chosen, "values_chosen")
    v_rejected = vector.values(values_rejected, "values_rejected")
    # Chosen and rejected share the prompt, so one value tensor serves both.
    v_chosen = v_rejected if v_chosen is None else v_chosen
    v_rejected = v_chosen if v_rejected is None else v_rejected

    supplied = {
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
        "chosen_lengths": n_chosen,
        "rejected_lengths": n_rejected,
        "aux_rewards_chosen": aux_chosen,
        "aux_rewards_rejected": aux_rejected,
    }
    for name, spec in zip(names, specs):
        _check_requirements(name, spec, supplied)

    losses = torch.zeros(batch, dtype=dtype, device=device)
    terms: dict[str, Tensor] = {}
    extras: dict[str, Any] = {}
    for name, spec, weight in zip(names, specs, weights):
        ctx = LossContext(
            name=name,
            chosen_logps=chosen_logps,
            rejected_logps=rejected_logps,
            **supplied,  # the optional inputs, keyed by their LossContext field names
            values_chosen=v_chosen,
            values_rejected=v_rejected,
            beta=beta,
            label_smoothing=label_smoothing,
            options={key: options.get(key, default) for key, default in spec.options.items()},
        )
        per_pair, term_metrics = spec.fn(ctx)
        if per_pair.shape != (batch,):
            raise RuntimeError(f"loss {name!r} returned shape {tuple(per_pair.shape)}, expected ({batch},)")
        terms[name] = per_pair.mean()
        losses = losses + weight * per_pair
        extras.update(term_metrics)

    metrics = _reward_metrics(chosen_logps, rejected_logps, ref_chosen, ref_rejected, n_chosen, n_rejected, beta)
    metrics.update({key: _to_float(value) for key, value in extras.items()})
    return LossOutput(loss=losses.mean(), losses=losses, terms=terms, metrics=metrics)


# --------------------------------------------------------------------------- validation
def _resolve_loss_types(loss_type: Any, loss_weights: Any) -> tuple[list[str], list[float]]:
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not names:
        raise ValueError("loss_type must name at least one loss")
    for name in names:
        try:
            loss_spec(name)
        except ValueError as err:
            raise ValueError(f"loss_type: {err}") from None
    if len(set(names)) != len(names):
        raise ValueError(f"loss_type lists a loss twice: {names}")

    if loss_weights is None:
        return names, [1.0] * len(names)
    if isinstance(loss_weights, (int, float)):
        loss_weights = [loss_weights]
    weights = [float(w) for w in loss_weights]
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries but loss_type has {len(names)}: {names}")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"loss_weights must be finite, got {weights}")
    return names, weights


def _check_options(options: Mapping[str, Any], names: list[str], specs: list[LossSpec]) -> None:
    accepted = {key for spec in specs for key in spec.options}
    unknown = sorted(set(options) - accepted)
    if not unknown:
        return
    hints = []
    for key in unknown:
        readers = sorted({spec.name for spec in _REGISTRY.values() if key in spec.options})
        if readers:
            hints.append(f"{key!r} is read by {', '.join(readers)}")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise ValueError(
        f"unknown option(s) {', '.join(map(repr, unknown))} for loss_type {names}{hint}; "
        f"accepted options: {', '.join(sorted(accepted)) or 'none'}"
    )


def _check_hyperparameters(beta: Any, label_smoothing: Any) -> tuple[float, float]:
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be finite and > 0, got {beta}")
    label_smoothing = float(label_smoothing)
    if not (0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    return beta, label_smoothing


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The inputs' common floating dtype, promoted to at least float32."""
    dtype = torch.float32
    for tensor in tensors:
        if isinstance(tensor, Tensor) and tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _batch_size(policy_chosen_logps: Any) -> int:
    if not isinstance(policy_chosen_logps, Tensor):
        raise ValueError(f"policy_chosen_logps must be a 1-D tensor [B], got {type(policy_chosen_logps)}")
    if policy_chosen_logps.ndim != 1:
        raise ValueError(f"policy_chosen_logps must be a 1-D tensor [B], got {tuple(policy_chosen_logps.shape)}")
    if policy_chosen_logps.numel() == 0:
        raise ValueError("policy_chosen_logps is empty: a batch needs at least one pair")
    return policy_chosen_logps.shape[0]


def _check_finite(tensor: Tensor, argument: str) -> None:
    if not bool(torch.isfinite(tensor.detach()).all()):
        raise ValueError(f"{argument} contains NaN or inf")


class _VectorChecker:
    """Converts and validates the per-pair inputs against batch size, dtype and device."""

    def __init__(self, batch: int, dtype: torch.dtype, device: torch.device):
        self.batch, self.dtype, self.device = batch, dtype, device

    def _tensor(self, value: Any) -> Tensor:
        # Python numbers go straight to the compute dtype (never through float32).
        return value if isinstance(value, Tensor) else torch.as_tensor(value, dtype=self.dtype, device=self.device)

    def _vector(self, value: Any, argument: str) -> Tensor:
        tensor = self._tensor(value)
        if tensor.shape != (self.batch,):
            raise ValueError(
                f"{argument} must have shape ({self.batch},) like policy_chosen_logps, got {tuple(tensor.shape)}"
            )
        tensor = tensor.to(device=self.device, dtype=self.dtype)  # differentiable cast
        _check_finite(tensor, argument)
        return tensor

    def logps(self, value: Any, argument: str) -> Tensor:
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise ValueError(f"{argument} must be a floating-point tensor")
        return self._vector(value, argument)

    def optional_logps(self, value: Any, argument: str) -> Tensor | None:
        return None if value is None else self.logps(value, argument)

    def lengths(self, value: Any, argument: str) -> Tensor | None:
        if value is None:
            return None
        tensor = self._vector(value, argument).detach()
        if not bool((tensor > 0).all()):
            raise ValueError(f"{argument} must be > 0 for every response (a response with no token)")
        return tensor

    def values(self, value: Any, argument: str) -> Tensor | None:
        return None if value is None else self._vector(value, argument)

    def aux_rewards(self, chosen: Any, rejected: Any) -> tuple[Tensor | None, Tensor | None]:
        if chosen is None and rejected is None:
            return None, None
        if chosen is None or rejected is None:
            missing = "aux_rewards_chosen" if chosen is None else "aux_rewards_rejected"
            raise ValueError(f"{missing} is missing: give aux rewards for both chosen and rejected")
        matrices = []
        for value, argument in ((chosen, "aux_rewards_chosen"), (rejected, "aux_rewards_rejected")):
            given = self._tensor(value).detach()
            tensor = given.unsqueeze(-1) if given.ndim == 1 else given
            if tensor.ndim != 2 or tensor.shape[0] != self.batch or tensor.shape[1] == 0:
                raise ValueError(
                    f"{argument} must have shape ({self.batch},) or ({self.batch}, K), got {tuple(given.shape)}"
                )
            tensor = tensor.to(device=self.device, dtype=self.dtype)
            _check_finite(tensor, argument)
            matrices.append(tensor)
        if matrices[0].shape != matrices[1].shape:
            raise ValueError(
                f"aux_rewards_chosen {tuple(matrices[0].shape)} and aux_rewards_rejected "
                f"{tuple(matrices[1].shape)} must have the same shape"
            )
        return matrices[0], matrices[1]


def _check_requirements(name: str, spec: LossSpec, supplied: Mapping[str, Tensor | None]) -> None:
    required = []
    if spec.needs_reference:
        required += ["ref_chosen_logps", "ref_rejected_logps"]
    if spec.needs_lengths:
        required += ["chosen_lengths"] if spec.needs_lengths == "chosen" else ["chosen_lengths", "rejected_lengths"]
    if spec.needs_aux_rewards:
        required += ["aux_rewards_chosen", "aux_rewards_rejected"]
    for argument in required:
        if supplied[argument] is None:
            raise ValueError(f"{argument} is required by loss {name!r}")


# --------------------------------------------------------------------------- option helpers
def _float_option(ctx: LossContext, key: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    value = ctx.options[key]
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {key} of loss {ctx.name!r} must be a number, got {value!r}") from None
    if not math.isfinite(value) or (positive and value <= 0) or (nonnegative and value < 0):
        bound = " > 0" if positive else " >= 0" if nonnegative else ""
        raise ValueError(f"option {key} of loss {ctx.name!r} must be finite{bound}, got {value}")
    return value


def _scalar_tensor_option(ctx: LossContext, key: str, like: Tensor) -> Tensor:
    """A user-given scalar (float or tensor) as a detached tensor in the compute dtype."""
    # dtype given up front: a Python float must not pass through float32 on its way to float64.
    value = torch.as_tensor(ctx.options[key], dtype=like.dtype, device=like.device).detach()
    if value.numel() != 1 or not bool(torch.isfinite(value).all()):
        raise ValueError(f"option {key} of loss {ctx.name!r} must be one finite number, got {ctx.options[key]!r}")
    return value.reshape(())


def _log_sigmoid(x: Tensor) -> Tensor:
    """log sigma(x) as -softplus(-x).

    Same values and gradients as ``F.logsigmoid``, whose CPU kernel enters a parallel
    region even for a handful of elements and then costs milliseconds per call on a busy
    host. Above the threshold softplus is the identity, and the neglected ``exp(-50)`` is
    below float64 resolution.
    """
    return -F.softplus(-x, threshold=50.0)


def _smoothed_logistic(logits: Tensor, eps: float) -> Tensor:
    """Conservative logistic loss: label eps flipped (cDPO)."""
    return -(1 - eps) * _log_sigmoid(logits) - eps * _log_sigmoid(-logits)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 to avoid cancellation (Maechler 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


NO_METRICS: Mapping[str, Any] = {}


# --------------------------------------------------------------------------- DPO family
@register_loss("sigmoid", needs_reference=True)
def _sigmoid_loss(ctx: LossContext):
    return _smoothed_logistic(ctx.beta * ctx.margin, ctx.label_smoothing), NO_METRICS


@register_loss("robust", needs_reference=True)
def _robust_loss(ctx: LossContext):
    # Unbiased under label noise eps: (1-eps) L(h) + eps L(-h) = -ls(beta h).
    logits, eps = ctx.beta * ctx.margin, ctx.label_smoothing
    return (-(1 - eps) * _log_sigmoid(logits) + eps * _log_sigmoid(-logits)) / (1 - 2 * eps), NO_METRICS


@register_loss("hinge", needs_reference=True)
def _hinge_loss(ctx: LossContext):
    return torch.relu(1 - ctx.beta * ctx.margin), NO_METRICS


@register_loss("ipo", needs_reference=True, needs_lengths=True)
def _ipo_loss(ctx: LossContext):
    # TRL (confirmed with the IPO authors) averages log-ratios per token so that beta
    # does not depend on response length.
    margin = ctx.chosen_logratios / ctx.chosen_lengths - ctx.rejected_logratios / ctx.rejected_lengths
    return (margin - 1 / (2 * ctx.beta)) ** 2, NO_METRICS


@register_loss("exo_pair", needs_reference=True)
def _exo_pair_loss(ctx: LossContext):
    # KL(p_model || p_label) over {chosen, rejected} with p_label = (1 - eps, eps);
    # eps = 0 would make log(eps) infinite, so fall back to the paper's 1e-3.
    eps = ctx.label_smoothing or 1e-3
    logits = ctx.beta * ctx.margin
    chosen_term = torch.sigmoid(logits) * (_log_sigmoid(logits) - math.log1p(-eps))
    rejected_term = torch.sigmoid(-logits) * (_log_sigmoid(-logits) - math.log(eps))
    return chosen_term + rejected_term, NO_METRICS


@register_loss("nca_pair", needs_reference=True)
def _nca_pair_loss(ctx: LossContext):
    chosen_rewards = ctx.beta * ctx.chosen_logratios
    rejected_rewards = ctx.beta * ctx.rejected_logratios
    per_pair = (
        -_log_sigmoid(chosen_rewards) - 0.5 * _log_sigmoid(-chosen_rewards) - 0.5 * _log_sigmoid(-rejected_rewards)
    )
    return per_pair, NO_METRICS


@register_loss("bco_pair", needs_reference=True, options={"bco_delta": None})
def _bco_pair_loss(ctx: LossContext):
    chosen_rewards = ctx.beta * ctx.chosen_logratios
    rejected_rewards = ctx.beta * ctx.rejected_logratios
    if ctx.options["bco_delta"] is None:
        # Stateless stand-in for TRL 0.x's running mean: this batch's mean reward.
        delta = torch.cat([chosen_rewards, rejected_rewards]).mean().detach()
    else:
        delta = _scalar_tensor_option(ctx, "bco_delta", chosen_rewards)
    per_pair = -_log_sigmoid(chosen_rewards - delta) - _log_sigmoid(-(rejected_rewards - delta))
    return per_pair, {"bco/delta": delta}


@register_loss("sppo_hard", needs_reference=True)
def _sppo_hard_loss(ctx: LossContext):
    half_inverse_beta = 0.5 / ctx.beta
    per_pair = (ctx.chosen_logratios - half_inverse_beta) ** 2 + (ctx.rejected_logratios + half_inverse_beta) ** 2
    return per_pair, NO_METRICS


@register_loss("apo_zero", needs_reference=True)
def _apo_zero_loss(ctx: LossContext):
    # Chosen better than the model's own outputs: push chosen up and rejected down.
    per_pair = 1 - torch.sigmoid(ctx.beta * ctx.chosen_logratios) + torch.sigmoid(ctx.beta * ctx.rejected_logratios)
    return per_pair, NO_METRICS


@register_loss("apo_down", needs_reference=True)
def _apo_down_loss(ctx: LossContext):
    # Chosen worse than the model's own outputs: push both down, rejected more.
    return torch.sigmoid(ctx.beta * ctx.chosen_logratios) + 1 - torch.sigmoid(ctx.beta * ctx.margin), NO_METRICS


@register_loss("discopop", needs_reference=True, options={"discopop_tau": 0.05})
def _discopop_loss(ctx: LossContext):
    tau = _float_option(ctx, "discopop_tau", positive=True)
    logits = ctx.beta * ctx.margin
    modulation = torch.sigmoid(logits / tau)
    logistic = -_log_sigmoid(logits)
    # m * exp(-logits) in log space: TRL's product is inf * 0 = NaN for very negative logits.
    exponential = torch.exp(_log_sigmoid(logits / tau) - logits)
    return logistic * (1 - modulation) + exponential, NO_METRICS


# --------------------------------------------------------------------------- reference-free
_SIMPO_DEFAULT_GAMMA = 0.5  # TRL CPOConfig.simpo_gamma


@register_loss("simpo", needs_reference=False, needs_lengths=True, options={"gamma": None, "gamma_beta_ratio": None})
def _simpo_loss(ctx: LossContext):
    has_gamma, has_ratio = ctx.options["gamma"] is not None, ctx.options["gamma_beta_ratio"] is not None
    if has_gamma and has_ratio:
        raise ValueError("options gamma and gamma_beta_ratio of loss 'simpo' are exclusive: give one")
    if has_gamma:
        gamma = _float_option(ctx, "gamma")
    elif has_ratio:
        gamma = _float_option(ctx, "gamma_beta_ratio") * ctx.beta
    else:
        gamma = _SIMPO_DEFAULT_GAMMA
    logits = ctx.beta * (ctx.chosen_mean_logps - ctx.rejected_mean_logps) - gamma
    return _smoothed_logistic(logits, ctx.label_smoothing), NO_METRICS


# ORPO's log-odds are undefined at probability 1; keep the mean log-prob a hair below 0.
_ORPO_MAX_MEAN_LOGP = -1e-6


@register_loss("orpo", needs_reference=False, needs_lengths=True, options={"orpo_lambda": None})
def _orpo_loss(ctx: LossContext):
    weight = ctx.beta if ctx.options["orpo_lambda"] is None else _float_option(ctx, "orpo_lambda", nonnegative=True)
    for logps, argument in ((ctx.chosen_logps, "policy_chosen_logps"), (ctx.rejected_logps, "policy_rejected_logps")):
        if bool((logps > 0).any()):
            raise ValueError(f"{argument} must be <= 0 (log-probabilities) for loss 'orpo'")
    chosen_mean = ctx.chosen_mean_logps.clamp(max=_ORPO_MAX_MEAN_LOGP)
    rejected_mean = ctx.rejected_mean_logps.clamp(max=_ORPO_MAX_MEAN_LOGP)
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    log_sigmoid_odds = _log_sigmoid(log_odds)
    nll = -ctx.chosen_mean_logps
    metrics = {
        "orpo/nll_loss": nll.mean(),
        "orpo/log_odds_ratio": log_sigmoid_odds.mean(),  # TRL's names for these two
        "orpo/log_odds_chosen": log_odds.mean(),
    }
    return nll - weight * log_sigmoid_odds, metrics


@register_loss("nll", needs_reference=False, needs_lengths="chosen", options={"alpha": 1.0}, aliases=("rpo",))
def _nll_loss(ctx: LossContext):
    # Per-response token-mean NLL averaged over pairs (TRL averages over all chosen tokens;
    # the two agree when the chosen responses have equal lengths).
    return _float_option(ctx, "alpha") * -ctx.chosen_mean_logps, NO_METRICS


# --------------------------------------------------------------------------- KTO
@register_loss(
    "kto",
    needs_reference=True,
    options={"desirable_weight": 1.0, "undesirable_weight": 1.0, "kl": None},
)
def _kto_loss(ctx: LossContext):
    desirable = _float_option(ctx, "desirable_weight", nonnegative=True)
    undesirable = _float_option(ctx, "undesirable_weight", nonnegative=True)
    chosen, rejected = ctx.chosen_logratios, ctx.rejected_logratios
    if ctx.options["kl"] is None:
        # Paired data: estimate KL(policy || ref) from the batch's own responses.
        kl = torch.cat([chosen, rejected]).mean().detach().clamp(min=0)
    else:
        kl = _scalar_tensor_option(ctx, "kl", chosen)
    chosen_losses = 1 - torch.sigmoid(ctx.beta * (chosen - kl))
    rejected_losses = 1 - torch.sigmoid(ctx.beta * (kl - rejected))
    # Halved so that the batch mean is the mean over all 2B examples, as in TRL.
    return (desirable * chosen_losses + undesirable * rejected_losses) / 2, {"kto/kl": kl}


# --------------------------------------------------------------------------- UPO
_UPO_OPTIONS = {
    "upo_lambda": 1.0,
    "beta_aux": 1.0,
    "omega_max": 20.0,
    "expectile": 0.7,
    "aux_weights": None,
    "baseline": None,  # "value" when values are given, else "pair_mean"; or "batch_mean"
    "aux_normalize": "mean",
}


def _combined_aux_reward(ctx: LossContext) -> tuple[Tensor, Tensor]:
    """r_aux = sum_k w_k a_k for chosen and rejected, [B] each."""
    aux_chosen, aux_rejected = ctx.aux_rewards_chosen, ctx.aux_rewards_rejected
    columns = aux_chosen.shape[1]
    weights = ctx.options["aux_weights"]
    if weights is None:
        weights = torch.ones(columns, dtype=aux_chosen.dtype, device=aux_chosen.device)
    else:
        weights = torch.as_tensor(weights, dtype=aux_chosen.dtype, device=aux_chosen.device).detach().reshape(-1)
        if weights.numel() != columns:
            raise ValueError(
                f"option aux_weights has {weights.numel()} entries, aux rewards have K = {columns} columns"
            )
        _check_finite(weights, "option aux_weights")
    return aux_chosen @ weights, aux_rejected @ weights


def _baselines(ctx: LossContext, reward_chosen: Tensor, reward_rejected: Tensor) -> tuple[Tensor, Tensor]:
    """V(x) for the advantage, always detached (the value head learns only from L_V)."""
    has_values = ctx.values_chosen is not None
    kind = ctx.options["baseline"] or ("value" if has_values else "pair_mean")
    if kind == "value":
        if not has_values:
            raise ValueError("values_chosen (or values_rejected) is required by loss 'upo' with baseline='value'")
        return ctx.values_chosen.detach(), ctx.values_rejected.detach()
    if kind == "pair_mean":
        pair_mean = (reward_chosen + reward_rejected) / 2
        return pair_mean, pair_mean
    if kind == "batch_mean":
        batch_mean = torch.cat([reward_chosen, reward_rejected]).mean().expand_as(reward_chosen)
        return batch_mean, batch_mean
    raise ValueError(f"option baseline of loss 'upo' must be 'value', 'pair_mean' or 'batch_mean', got {kind!r}")


def _expectile_loss(residual: Tensor, tau: float) -> Tensor:
    """|tau - 1[u < 0]| u^2: tau > 0.5 pulls V towards an upper expectile of r_aux (IQL)."""
    weight = (tau - (residual < 0).to(residual.dtype)).abs()
    return weight * residual**2


@register_loss("upo", needs_reference=False, needs_aux_rewards=True, options=_UPO_OPTIONS)
def _upo_loss(ctx: LossContext):
    upo_lambda = _float_option(ctx, "upo_lambda")
    beta_aux = _float_option(ctx, "beta_aux", positive=True)
    omega_max = _float_option(ctx, "omega_max", positive=True)
    tau = _float_option(ctx, "expectile")
    if not 0 < tau < 1:
        raise ValueError(f"option expectile of loss 'upo' must lie in (0, 1), got {tau}")
    normalize = ctx.options["aux_normalize"]
    if normalize == "mean":
        chosen_x, rejected_x = ctx.chosen_mean_logps, ctx.rejected_mean_logps
    elif normalize == "sum":
        chosen_x, rejected_x = ctx.chosen_logps, ctx.rejected_logps
    else:
        raise ValueError(f"option aux_normalize of loss 'upo' must be 'mean' or 'sum', got {normalize!r}")

    reward_chosen, reward_rejected = _combined_aux_reward(ctx)
    baseline_chosen, baseline_rejected = _baselines(ctx, reward_chosen, reward_rejected)
    with torch.no_grad():
        advantage_chosen = reward_chosen - baseline_chosen
        advantage_rejected = reward_rejected - baseline_rejected
        # exp may overflow to inf; the clamp turns that into omega_max.
        omega_chosen = torch.exp(advantage_chosen / beta_aux).clamp(max=omega_max)
        omega_rejected = torch.exp(advantage_rejected / beta_aux).clamp(max=omega_max)
    # Halved so that the batch mean is the mean over all 2B responses.
    aux_per_pair = -(omega_chosen * chosen_x + omega_rejected * rejected_x) / 2

    if ctx.values_chosen is None:
        value_per_pair = torch.zeros_like(aux_per_pair)
    else:
        value_per_pair = (
            _expectile_loss(reward_chosen - ctx.values_chosen, tau)
            + _expectile_loss(reward_rejected - ctx.values_rejected, tau)
        ) / 2

    metrics = {
        "aux/advantage_mean": torch.cat([advantage_chosen, advantage_rejected]).mean(),
        "aux/weight_mean": torch.cat([omega_chosen, omega_rejected]).mean(),
        "aux/reward_chosen": reward_chosen.mean(),
        "aux/reward_rejected": reward_rejected.mean(),
        "value/loss": value_per_pair.mean(),
    }
    return upo_lambda * aux_per_pair + value_per_pair, metrics


class ValueHead(nn.Module):
    """V(x): a scalar value of the prompt, for the UPO advantage baseline.

    Reads the policy's hidden state at the last prompt token, detached so that only the
    expectile loss trains it and the policy never learns from the value loss. LayerNorm
    keeps the scale of very different backbones comparable; the projection starts at 0
    so the first baseline is neutral.
    """

    def __init__(self, hidden_size: int, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be > 0, got {hidden_size}")
        self.hidden_size = hidden_size
        self.norm = nn.LayerNorm(hidden_size, dtype=dtype)
        self.proj = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, prompt_hidden: Tensor) -> Tensor:
        """[..., D] hidden states -> [...] values in the head's dtype (float32 by default)."""
        if prompt_hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"prompt_hidden must end in hidden_size={self.hidden_size}, got {tuple(prompt_hidden.shape)}"
            )
        hidden = prompt_hidden.detach().to(self.proj.weight.dtype)
        return self.proj(self.norm(hidden)).squeeze(-1)


# --------------------------------------------------------------------------- metrics
def _to_float(value: Any) -> float:
    return float(value.detach().item()) if isinstance(value, Tensor) else float(value)


@torch.no_grad()
def _reward_metrics(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    n_chosen: Tensor | None,
    n_rejected: Tensor | None,
    beta: float,
) -> dict[str, float]:
    """TRL's reward metrics: implicit rewards beta*(S - R), or beta*Sbar / beta*S without a reference."""
    if ref_chosen is not None and ref_rejected is not None:
        chosen_scores, rejected_scores = chosen_logps - ref_chosen, rejected_logps - ref_rejected
    elif n_chosen is not None and n_rejected is not None:
        chosen_scores, rejected_scores = chosen_logps / n_chosen, rejected_logps / n_rejected
    else:
        chosen_scores, rejected_scores = chosen_logps, rejected_logps
    chosen_rewards, rejected_rewards = beta * chosen_scores, beta * rejected_scores
    return {
        "rewards/chosen": _to_float(chosen_rewards.mean()),
        "rewards/rejected": _to_float(rejected_rewards.mean()),
        "rewards/margins": _to_float((chosen_rewards - rejected_rewards).mean()),
        "rewards/accuracies": _to_float((chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean()),
        "logps/chosen": _to_float(chosen_logps.mean()),
        "logps/rejected": _to_float(rejected_logps.mean()),
    }
