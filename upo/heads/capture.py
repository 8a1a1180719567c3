"""The LM head's input, captured from the model's own forward with the head's ``forward`` stubbed out.

Every transform a model applies between its decoder and the vocabulary projection (a divisor such as
MiniCPM3's, BERT's dense + LayerNorm, ELECTRA's sibling generator module, dtype casts) is applied by
the model itself: nothing about the architecture has to be known. The stub records its input and
returns a zero-width tensor, which flows through whatever the forward does with logits (scaling,
``tanh``, ``.float()``, slicing) at no cost, so the ``[tokens, vocab]`` logits never exist. The stub
is an instance attribute, so ``__call__`` still runs the module's hooks (FSDP, accelerate).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator

import torch
from torch import nn

from upo.heads.errors import UnsupportedModelError, model_name


@contextlib.contextmanager
def replaced_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """``module.forward = forward`` for the duration (an instance attribute it had is put back)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def _first_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


@contextlib.contextmanager
def recorded_head(head: nn.Module, output: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[list]:
    """Stub ``head``: each call appends its input to the yielded list and returns ``output(input)``."""
    seen: list[torch.Tensor] = []

    def forward(*args, **kwargs):
        x = _first_argument(args, kwargs)
        seen.append(x)
        return output(x)

    with replaced_forward(head, forward):
        yield seen


def zero_width(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(*x.shape[:-1], 0)


@functools.lru_cache(maxsize=None)
def _accepts(model_class: type) -> tuple[frozenset, bool]:
    """The keyword names ``model_class.forward`` takes, and whether it takes ``**kwargs``."""
    parameters = inspect.signature(model_class.forward).parameters.values()
    names = frozenset(p.name for p in parameters)
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def call_causal_lm(model: nn.Module, input_ids: torch.Tensor, attention_mask=None, position_ids=None, **extra):
    """``model(input_ids=..., use_cache=False, ...)`` with only the arguments given (and that it takes)."""
    names, var_kw = _accepts(type(model))
    kwargs = dict(input_ids=input_ids, **extra)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        if "position_ids" not in names and not var_kw:
            raise UnsupportedModelError(f"{model_name(model)} takes no position_ids: packed (padding-free) "
                                        "batches are not possible with it; use padded batches")
        kwargs["position_ids"] = position_ids
    if "use_cache" in names or var_kw:  # no KV cache: one pass over whole sequences
        kwargs["use_cache"] = False
    return model(**kwargs)


def output_logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def head_input(model: nn.Module, head: nn.Module, hidden_size: int, input_ids: torch.Tensor,
               attention_mask=None, position_ids=None, **forward_kwargs) -> torch.Tensor:
    """``[*input_ids.shape, D]``: what ``head`` receives in ``model``'s own forward (differentiable)."""
    with recorded_head(head, zero_width) as seen:
        call_causal_lm(model, input_ids, attention_mask, position_ids, **forward_kwargs)
    return checked_capture(model, seen, input_ids, hidden_size)


def _replicated(x: torch.Tensor) -> bool:
    placements = getattr(x, "placements", None)
    return placements is not None and hasattr(x, "to_local") and all(p.is_replicate() for p in placements)


def checked_capture(model: nn.Module, seen: list, input_ids: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """The one recorded head input, refused unless it is one hidden state per token."""
    if len(seen) != 1:
        raise UnsupportedModelError(f"{model_name(model)}: its forward calls the LM head {len(seen)} times; "
                                    "upo needs one vocabulary projection of one hidden state per token")
    hidden = seen[0]
    if _replicated(hidden):  # a tensor-parallel head's input (a Replicate DTensor): every rank's whole copy
        hidden = hidden.to_local()
    expected = (*input_ids.shape, hidden_size)
    if tuple(hidden.shape) != expected:
        raise UnsupportedModelError(
            f"{model_name(model)}: its LM head receives a tensor of shape {tuple(hidden.shape)}, not one "
            f"hidden state per input token {expected} (e.g. several prediction streams per token)")
    return hidden
