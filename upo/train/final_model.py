"""``model/``: the trained policy in Hugging Face format, with its tokenizer, loadable with ``from_pretrained``;
UPO's value head beside it as ``model/value_head.safetensors`` (``upo.value_head.load_value_head``)."""
from __future__ import annotations

from pathlib import Path

from torch import nn


def save_final_model(policy: nn.Module, tokenizer, target: Path, gathered_state: dict | None = None) -> None:
    """``policy.save_pretrained(target)`` (with LoRA: the adapters, loadable with ``peft``) and the tokenizer.

    ``gathered_state``: the full state of the wrapping module (keys ``policy.*``) when the module
    itself only holds shards (FSDP).
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # ours is the only progress bar
    try:
        if gathered_state is not None:
            prefix = "policy."
            policy_state = {k[len(prefix):]: v for k, v in gathered_state.items() if k.startswith(prefix)}
            policy.save_pretrained(target, state_dict=policy_state)
        else:
            policy.save_pretrained(target)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(target)


def save_final_value_head(value_head: nn.Module, target: Path, gathered_state: dict | None = None) -> Path:
    """``target/value_head.safetensors``; ``gathered_state`` as in :func:`save_final_model` (keys ``value_head.*``)."""
    from upo.value_head import save_value_head

    if gathered_state is not None:
        prefix = "value_head."
        return Path(save_value_head({k[len(prefix):]: v for k, v in gathered_state.items() if k.startswith(prefix)},
                                    target))
    return Path(save_value_head(value_head, target))
