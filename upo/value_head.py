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
