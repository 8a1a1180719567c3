"""The decoder layers of a causal LM: the units FSDP shards one by one.

``get_decoder()`` is not reliable for this (transformers 5 returns ModernBERT-decoder's vocabulary
projection, and nothing useful on Llama 4 / Mllama), so the layers are found structurally: the
``nn.ModuleList`` holding the most parameters, outside the LM head.
"""
from __future__ import annotations

from torch import nn

from upo.heads.errors import unwrap


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of the largest ``nn.ModuleList`` of ``model`` (not inside its LM head); ``[]`` if none."""
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    inside_head = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    best, best_size = None, 0
    for module in base.modules():
        if not isinstance(module, nn.ModuleList) or id(module) in inside_head or not len(module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = module, size
    return list(best) if best is not None else []
