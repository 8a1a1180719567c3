"""UPO's value head beside the policy: a submodule of the causal LM, saved in its own file.

As a submodule (``causal_lm.upo_value_head``) the head is moved, wrapped, synchronised and
sharded with the model by whatever runs it (accelerate, DDP, FSDP, DeepSpeed), and it runs
inside the model's forward. It is kept out of the model's own files (``_keys_to_ignore_on_save``),
so ``from_pretrained`` of a saved output loads a plain model, and it is written beside them as
``value_head.safetensors`` in every checkpoint and in the final output directory.
"""
from __future__ import annotations

import torch
from torch import nn

from upo import ValueHead
from upo.heads import describe_lm_head
from upo.value_head import VALUE_HEAD_FILE, load_value_head, load_value_head_state
from upo.value_head import save_value_head as write_value_head

ATTRIBUTE = "upo_value_head"
__all__ = ["ATTRIBUTE", "VALUE_HEAD_FILE", "attach_value_head", "load_value_head", "load_value_head_into",
           "save_value_head", "value_head_state"]


def attach_value_head(causal_lm: nn.Module) -> ValueHead:
    """A new value head on ``causal_lm`` (hidden size and device of its LM head), fp32."""
    described = describe_lm_head(causal_lm)
    head = ValueHead(described.hidden_size).to(described.weight_and_bias()[0].device)
    causal_lm.add_module(ATTRIBUTE, head)
    keys = {f"{ATTRIBUTE}.{name}" for name in head.state_dict()}
    causal_lm._keys_to_ignore_on_save = set(getattr(causal_lm, "_keys_to_ignore_on_save", None) or ()) | keys
    return head


def value_head_state(source: nn.Module | dict) -> dict[str, torch.Tensor]:
    """The head's tensors, from the head or from a full state dict of the model (any key prefix)."""
    if isinstance(source, nn.Module):
        return {name: tensor.detach() for name, tensor in source.state_dict().items()}
    marker = f"{ATTRIBUTE}."
    return {key.split(marker, 1)[1]: tensor for key, tensor in source.items() if marker in key}


def save_value_head(source: nn.Module | dict, directory: str) -> bool:
    """Write ``value_head.safetensors`` into ``directory``; False when ``source`` holds no head tensors."""
    state = value_head_state(source)
    if not state:
        return False
    write_value_head(state, directory)
    return True


def load_value_head_into(head: nn.Module, directory: str) -> None:
    """Restore ``head`` from ``directory``'s ``value_head.safetensors`` (``FileNotFoundError`` if absent)."""
    head.load_state_dict(load_value_head_state(directory, str(next(head.parameters()).device)))
