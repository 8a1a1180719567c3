"""UPO's value head beside the policy: a submodule of the causal LM, saved in its own file.

As a submodule (``causal_lm.upo_value_head``) the head is moved, wrapped, synchronised and
sharded with the model by whatever runs it (accelerate, DDP, FSDP, DeepSpeed), and it runs
inside the model's forward. It is kept out of the model's own files (``_keys_to_ignore_on_save``),
so ``from_pretrained`` of a saved output loads a plain model, and it is written beside them as
``value_head.safetensors`` in every checkpoint and in the final output directory.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from upo import ValueHead
from upo.heads import describe_lm_head

ATTRIBUTE = "upo_value_head"
VALUE_HEAD_FILE = "value_head.safetensors"


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
    hidden_size = state["proj.weight"].shape[1]
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in state.items()}
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, VALUE_HEAD_FILE), metadata={"hidden_size": str(hidden_size)})
    return True


def _saved_state(directory: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = os.path.join(directory, VALUE_HEAD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: this directory was not written with UPO's value head")
    return load_file(path, device=device)


def load_value_head_into(head: nn.Module, directory: str) -> None:
    """Restore ``head`` from ``directory``'s ``value_head.safetensors`` (``FileNotFoundError`` if absent)."""
    head.load_state_dict(_saved_state(directory, str(next(head.parameters()).device)))


def load_value_head(directory: str) -> ValueHead:
    """The value head saved in ``directory`` (a checkpoint or the final output directory)."""
    state = _saved_state(directory)
    head = ValueHead(state["proj.weight"].shape[1])
    head.load_state_dict(state)
    return head
