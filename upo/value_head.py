"""``upo.ValueHead``: the learned baseline V(x) of UPO's advantage ``A = r_aux - V(x)``."""
from __future__ import annotations

import torch
from torch import Tensor, nn


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


VALUE_HEAD_FILE = "value_head.safetensors"


def save_value_head(head: nn.Module | dict[str, Tensor], directory) -> str:
    """Write the head (or its state dict: ``norm.*``, ``proj.*``) as ``directory/value_head.safetensors``, fp32,
    with its ``hidden_size`` in the metadata; returns the file's path."""
    import os

    from safetensors.torch import save_file

    state = head.state_dict() if isinstance(head, nn.Module) else dict(head)
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in state.items()}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, VALUE_HEAD_FILE)
    save_file(state, path, metadata={"hidden_size": str(state["proj.weight"].shape[1])})
    return path


def load_value_head_state(directory, device: str = "cpu") -> dict[str, Tensor]:
    """The tensors of ``directory/value_head.safetensors`` (``FileNotFoundError`` naming the file if absent)."""
    import os

    from safetensors.torch import load_file

    path = os.path.join(directory, VALUE_HEAD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: this directory was not written with UPO's value head")
    return load_file(path, device=device)


def load_value_head(directory) -> ValueHead:
    """The value head saved in ``directory`` (by :func:`save_value_head`: ``upo-train``'s ``model/``,
    ``UPOTrainer``'s checkpoints and output directory)."""
    state = load_value_head_state(directory)
    head = ValueHead(state["proj.weight"].shape[1])
    head.load_state_dict(state)
    return head
