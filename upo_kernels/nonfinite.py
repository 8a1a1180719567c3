"""NaN or inf in the log-probs, reported by the name of the input that carries it (docs/kernels.md, "Numerical
contract").

The check reads the log-probs, not the inputs: one reduction over ``[tokens]`` values the kernels wrote anyway,
and one host sync, instead of a pass over a ``[vocab, hidden]`` weight on every call. Only when a log-prob is not
finite are the inputs scanned, to name the culprit. A NaN where no log-prob reads it (an ignored row's hidden
state) is no error: it changes no value and no gradient.
"""
from __future__ import annotations

import torch

from upo_kernels.vocab_parallel import local_shard


class NonFiniteError(ValueError):
    """A NaN or inf log-prob. ``inputs``: the argument names whose values are not all finite (empty: finite
    inputs whose logits overflowed, or the culprit lies on another rank's shard). A caller that passed its
    own tensors under other names (``upo.fused_loss``'s ``ref_hidden``) re-raises with :func:`renamed`."""

    def __init__(self, inputs: tuple[str, ...], names: dict[str, str] | None = None):
        self.inputs = inputs
        names = names or {}
        if inputs:
            said = ", ".join(names.get(name, name) for name in inputs)
            message = f"non-finite log-probs: {said} contain{'s' if len(inputs) == 1 else ''} NaN or inf"
        else:
            said = "/".join(names.get(name, name) for name in ("hidden", "weight"))
            message = (f"non-finite log-probs (NaN or inf) from finite {said}: the logits overflow their dtype, "
                       "or another rank's shard holds the NaN or inf")
        super().__init__(message)

    def renamed(self, names: dict[str, str]) -> "NonFiniteError":
        """The same error with the inputs called by the caller's names (``{"hidden": "ref_hidden", ...}``)."""
        return NonFiniteError(self.inputs, names)


def nonfinite_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[str, ...]:
    """The names of the inputs (this rank's shard of a sharded one) that hold NaN or inf; ``hidden``: the rows a
    log-prob reads."""
    read = {"hidden": hidden, "weight": weight, "bias": bias}
    return tuple(name for name, tensor in read.items()
                 if tensor is not None and not bool(torch.isfinite(local_shard(tensor).detach()).all()))


def check_finite_logprobs(logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          labels: torch.Tensor, ignore_index: int) -> None:
    """Raise :class:`NonFiniteError` naming ``hidden`` (its labelled rows), ``weight`` and ``bias`` where they hold
    NaN or inf, when the log-probs ``logp`` hold any (``hidden`` ``[N, D]``, ``labels`` ``[N]``)."""
    if not bool(torch.isfinite(logp.detach()).all()):
        raise NonFiniteError(nonfinite_inputs(hidden[labels != ignore_index], weight, bias))
