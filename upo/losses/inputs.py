"""Checks of everything :func:`upo.loss` is given, each failing with a ``ValueError`` naming the argument."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from upo.losses.f_divergence import F_DIVERGENCES
from upo.losses.registry import LossSpec, available_losses, loss_spec, option_readers


def resolve_loss_types(loss_type: Any, loss_weights: Any) -> tuple[list[str], list[float]]:
    """``loss_type`` as a list of known, distinct names and one finite weight per name."""
    try:
        names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    except TypeError:
        raise ValueError(f"loss_type must be a loss name or a list of names, got {loss_type!r}") from None
    if not names:
        raise ValueError("loss_type must name at least one loss")
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"loss_type must hold loss names (strings), got {name!r}")
        try:
            loss_spec(name)
        except ValueError as err:
            raise ValueError(f"loss_type: {err}") from None
    if len(set(names)) != len(names):
        raise ValueError(f"loss_type lists a loss twice: {names}")

    if loss_weights is None:
        return names, [1.0] * len(names)
    if isinstance(loss_weights, (int, float, Tensor)) and not isinstance(loss_weights, bool):
        loss_weights = [loss_weights]
    if isinstance(loss_weights, str):
        raise ValueError(f"loss_weights must be a list of numbers, one per loss_type, got {loss_weights!r}")
    try:
        weights = [finite_number(w, "loss_weights", "numbers") for w in loss_weights]
    except TypeError:
        raise ValueError(f"loss_weights must be a list of numbers, one per loss_type, got {loss_weights!r}") from None
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries but loss_type has {len(names)}: {names}")
    return names, weights


def check_options(options: Mapping[str, Any], names: list[str], specs: list[LossSpec]) -> None:
    """Refuse option names that no selected loss declares, hinting at the losses that read them."""
    accepted = {key for spec in specs for key in spec.options}
    unknown = sorted(set(options) - accepted)
    if not unknown:
        return
    hints = []
    for key in unknown:
        readers = option_readers(key)
        if readers:
            hints.append(f"{key!r} is read by {', '.join(readers)}")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise ValueError(
        f"unknown option(s) {', '.join(map(repr, unknown))} for loss_type {names}{hint}; "
        f"accepted options: {', '.join(sorted(accepted)) or 'none'}"
    )


def check_hyperparameters(beta: Any, label_smoothing: Any) -> tuple[float, float]:
    beta = finite_number(beta, "beta")
    if not beta > 0:
        raise ValueError(f"beta must be finite and > 0, got {beta}")
    label_smoothing = finite_number(label_smoothing, "label_smoothing")
    if not (0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    return beta, label_smoothing


def finite_number(value: Any, argument: str, what: str = "a number") -> float:
    """``value`` as a finite float, or a ``ValueError`` naming ``argument`` (a boolean too: ``float(True)``
    would pass silently)."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.numel() != 1):
        raise ValueError(f"{argument} must be {what}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{argument} must be {what}, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{argument} must be finite, got {number}")
    return number


def check_f_divergence(f_divergence_type: Any, coef: Any, names: list[str], specs: list[LossSpec]) -> float:
    """A known type, a finite coefficient, and a non-default type only with losses that take it."""
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got {f_divergence_type!r}")
    coef = finite_number(coef, "f_alpha_divergence_coef")
    refused = [name for name, spec in zip(names, specs) if not spec.f_divergence]
    if f_divergence_type != "reverse_kl" and refused:
        accepted = sorted({loss_spec(name).name for name in available_losses() if loss_spec(name).f_divergence})
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is only supported for the loss types {accepted}; "
            f"{refused} use(s) the raw log-ratios: use f_divergence_type='reverse_kl' with them"
        )
    return coef


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The inputs' common floating dtype, promoted to at least float32."""
    dtype = torch.float32
    for tensor in tensors:
        if isinstance(tensor, Tensor) and tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def batch_size(logps: Any, argument: str = "policy_chosen_logps", rows: str = "B", unit: str = "pair") -> int:
    """The batch size read off the first log-prob vector (``argument``, ``[B]`` pairs or ``[N]`` rows)."""
    if not isinstance(logps, Tensor):
        raise ValueError(f"{argument} must be a 1-D tensor [{rows}], got {type(logps)}")
    if logps.ndim != 1:
        raise ValueError(f"{argument} must be a 1-D tensor [{rows}], got {tuple(logps.shape)}")
    if logps.numel() == 0:
        raise ValueError(f"{argument} is empty: a batch needs at least one {unit}")
    return logps.shape[0]


def check_finite(tensor: Tensor, argument: str) -> None:
    if not bool(torch.isfinite(tensor.detach()).all()):
        raise ValueError(f"{argument} contains NaN or inf")


def check_finite_loss(loss: Tensor, losses: Tensor, terms: Mapping[str, Tensor],
                      inputs: Mapping[str, Tensor | None], unit: str = "pair") -> None:
    """A loss that is NaN or inf although every input is finite (they were checked) is refused, naming the term,
    the ``unit`` (pair or row) and its largest input: an input too large for the compute dtype (a squared
    log-ratio of 1e30 is 1e60, beyond float32), never a silent ``inf``. ``terms``: each loss's per-``unit`` values;
    ``inputs``: the ``[B]`` or ``[B, K]`` tensors the terms read. One host sync when all is finite."""
    if bool(torch.isfinite(loss.detach()) & torch.isfinite(losses.detach()).all()):
        return
    bad = (~torch.isfinite(losses.detach())).nonzero()
    if bad.numel() == 0:
        raise ValueError(f"non-finite loss: the mean of the finite per-{unit} losses overflows {losses.dtype} "
                         f"(largest {float(losses.detach().abs().max()):.3g}); pass float64 inputs")
    row = int(bad[0])
    value = float(losses.detach()[row])
    term = next((name for name, per in terms.items() if not bool(torch.isfinite(per.detach()[row]))), None)
    if term is None:
        raise ValueError(f"non-finite loss ({value}) at {unit} {row} from finite terms: their weighted sum overflows "
                         f"{losses.dtype}; check loss_weights")
    sizes = {argument: float(t.detach()[row].abs().max()) for argument, t in inputs.items() if t is not None}
    name = max(sizes, key=sizes.get)
    raise ValueError(f"non-finite loss ({value}) from finite inputs: loss {term!r} overflows {losses.dtype} at "
                     f"{unit} {row}, whose largest input is {name} (|value| {sizes[name]:.3g}): check that input, "
                     "or pass float64 inputs")


def _python_dtype(value: Any) -> torch.dtype | None:
    """The dtype ``torch.as_tensor`` gives Python ``value`` (bool, int64 or float32; None: not numbers)."""
    try:
        return torch.as_tensor(value).dtype
    except (TypeError, ValueError, RuntimeError):
        return None


def _listed(tensor: Tensor, limit: int = 8) -> str:
    values = tensor.tolist()
    return str(values[:limit])[:-1] + ", ...]" if len(values) > limit else str(values)


class VectorChecker:
    """Converts and validates the per-pair inputs against batch size, dtype and device."""

    def __init__(self, batch: int, dtype: torch.dtype, device: torch.device, first: str = "policy_chosen_logps"):
        self.batch, self.dtype, self.device = batch, dtype, device
        self.first = first  # the argument the batch size was read from, for messages

    def _tensor(self, value: Any, argument: str, dtype: torch.dtype | None = None) -> Tensor:
        """``value`` as a tensor on the batch's device: a tensor elsewhere is refused (a silent copy would hide
        a mix-up, and a meta tensor fails deep inside torch); Python numbers go straight to ``dtype`` (default:
        the compute dtype, never through float32)."""
        if isinstance(value, Tensor):
            if value.device != self.device:
                raise ValueError(f"{argument} is on {value.device} but {self.first} is on {self.device}")
            return value
        try:
            return torch.as_tensor(value, dtype=dtype or self.dtype, device=self.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{argument} must be a tensor of numbers, got {value!r}") from None

    def _given(self, value: Any, argument: str) -> Tensor:
        """As :meth:`_tensor`, Python values in their own type (``[True]`` bool, ``[0.5]`` float): for inputs
        whose checks must see booleans and fractions as given."""
        return self._tensor(value, argument, dtype=None if isinstance(value, Tensor) else _python_dtype(value))

    def _vector(self, value: Any, argument: str) -> Tensor:
        tensor = self._tensor(value, argument)
        if tensor.shape != (self.batch,):
            raise ValueError(
                f"{argument} must have shape ({self.batch},) like {self.first}, got {tuple(tensor.shape)}"
            )
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise ValueError(f"{argument} must hold real numbers, got {tensor.dtype}")
        tensor = tensor.to(dtype=self.dtype)  # differentiable cast
        check_finite(tensor, argument)
        return tensor

    def logps(self, value: Any, argument: str) -> Tensor:
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise ValueError(f"{argument} must be a floating-point tensor")
        return self._vector(value, argument)

    def optional_logps(self, value: Any, argument: str) -> Tensor | None:
        return None if value is None else self.logps(value, argument)

    def reference_logps(self, value: Any, argument: str) -> Tensor | None:
        """A reference model's log-probs, detached: the reference is fixed, so no gradient reaches it (a caller
        that computed them with grad would otherwise train the reference too; docs/losses.md)."""
        return None if value is None else self.logps(value, argument).detach()

    def lengths(self, value: Any, argument: str) -> Tensor | None:
        """Token counts: whole numbers > 0 (a fractional or boolean count would divide by a wrong length)."""
        if value is None:
            return None
        tensor = self._given(value, argument)
        if tensor.dtype == torch.bool:
            raise ValueError(f"{argument} must hold whole token counts, got booleans")
        tensor = self._vector(tensor, argument).detach()
        if not bool((tensor == tensor.round()).all()):
            raise ValueError(f"{argument} must hold whole token counts, got {_listed(tensor)}")
        if not bool((tensor > 0).all()):
            raise ValueError(f"{argument} must be > 0 for every response (a response with no token), "
                             f"got {_listed(tensor)}")
        return tensor

    def values(self, value: Any, argument: str) -> Tensor | None:
        return None if value is None else self._vector(value, argument)

    def matrix(self, value: Any, argument: str) -> Tensor | None:
        """A detached ``[B]`` (one column) or ``[B, K]`` input in the compute dtype."""
        if value is None:
            return None
        given = self._tensor(value, argument).detach()
        tensor = given.unsqueeze(-1) if given.ndim == 1 else given
        if tensor.ndim != 2 or tensor.shape[0] != self.batch or tensor.shape[1] == 0:
            raise ValueError(
                f"{argument} must have shape ({self.batch},) or ({self.batch}, K), got {tuple(given.shape)}"
            )
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise ValueError(f"{argument} must hold real numbers, got {tensor.dtype}")
        tensor = tensor.to(dtype=self.dtype)
        check_finite(tensor, argument)
        return tensor

    def matrix_pair(self, chosen: Any, rejected: Any, names: tuple[str, str]) -> tuple[Tensor | None, Tensor | None]:
        """The chosen and rejected inputs ``names``: both or neither, as matrices of one shape."""
        if chosen is None and rejected is None:
            return None, None
        if chosen is None or rejected is None:
            missing = names[0] if chosen is None else names[1]
            raise ValueError(f"{missing} is missing: give {names[0]} and {names[1]}, or neither")
        matrices = [self.matrix(chosen, names[0]), self.matrix(rejected, names[1])]
        if matrices[0].shape != matrices[1].shape:
            raise ValueError(
                f"{names[0]} {tuple(matrices[0].shape)} and {names[1]} {tuple(matrices[1].shape)} "
                "must have the same shape"
            )
        return matrices[0], matrices[1]

    def flags(self, value: Any, argument: str) -> Tensor:
        """A ``[B]`` bool tensor from booleans or 0/1 numbers (``ValueError`` for anything else)."""
        tensor = self._given(value, argument)
        if tensor.shape != (self.batch,):
            raise ValueError(
                f"{argument} must have shape ({self.batch},) like {self.first}, got {tuple(tensor.shape)}"
            )
        if tensor.dtype != torch.bool:
            if tensor.is_complex() or not bool(((tensor == 0) | (tensor == 1)).all()):
                raise ValueError(f"{argument} must hold booleans (True: desirable) or 0/1, got {tensor.tolist()}")
            tensor = tensor != 0
        return tensor

    def aux_rewards(self, chosen: Any, rejected: Any) -> tuple[Tensor | None, Tensor | None]:
        return self.matrix_pair(chosen, rejected, ("aux_rewards_chosen", "aux_rewards_rejected"))


def check_requirements(name: str, spec: LossSpec, supplied: Mapping[str, Tensor | None]) -> None:
    """Every input loss ``name`` declares it needs (reference, lengths, aux rewards) is present."""
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
