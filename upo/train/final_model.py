"""``model/``: the trained policy in Hugging Face format, with its tokenizer, loadable with ``from_pretrained``.

Without LoRA ``model/`` is the whole model (``AutoModelForCausalLM`` + ``AutoTokenizer``). With LoRA it
holds the adapters (``AutoPeftModelForCausalLM``), whose ``base_model_name_or_path`` names a loadable
base: ``--model``'s folder (absolute) or Hugging Face id, or ``model/base/`` written beside them as plain
safetensors for the built-in tiny model and for a model read from a ``.gguf`` file (``smollm2``). The
built-in byte tokenizer is saved as an equivalent ``PreTrainedTokenizerFast``.
UPO's value head goes beside it as ``model/value_head.safetensors`` (``upo.value_head.load_value_head``).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from upo.pretrained import is_cached_conversion
from upo.train.data import ByteTokenizer
from upo.train.data.tokenizer import hf_byte_tokenizer
from upo.value_head import save_value_head

BASE_DIR = "base"


def save_final_model(policy: nn.Module, tokenizer, target: Path, gathered_state: dict | None = None) -> None:
    """``policy.save_pretrained(target)`` (with LoRA: the adapters, loadable with ``peft``) and the tokenizer.

    ``gathered_state``: the full state of the wrapping module (keys ``policy.*``) when the module
    itself only holds shards (FSDP).
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # ours is the only progress bar
    prefix = "policy."
    state = None if gathered_state is None else {k[len(prefix):]: v for k, v in gathered_state.items()
                                                 if k.startswith(prefix)}
    try:
        if hasattr(policy, "peft_config"):
            _point_adapters_at_base(policy, tokenizer, target, state)
        policy.save_pretrained(target, **({} if state is None else {"state_dict": state}))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    save_tokenizer(tokenizer, target)


def save_tokenizer(tokenizer, target: Path) -> None:
    hf = hf_byte_tokenizer() if isinstance(tokenizer, ByteTokenizer) else tokenizer
    if hasattr(hf, "save_pretrained"):
        hf.save_pretrained(target)


def _point_adapters_at_base(policy: nn.Module, tokenizer, target: Path, state: dict | None) -> None:
    """``base_model_name_or_path`` of every adapter: the model it was loaded from, or a saved copy of the base."""
    base = policy.get_base_model()
    source = getattr(base, "name_or_path", "") or ""
    if not source or is_cached_conversion(source):  # the tiny model (from a config), a GGUF file: saved here
        source = str((target / BASE_DIR).resolve())
        save_base_model(policy, target / BASE_DIR, state)
        save_tokenizer(tokenizer, target / BASE_DIR)
    for config in policy.peft_config.values():
        config.base_model_name_or_path = source


def save_base_model(policy: nn.Module, target: Path, state: dict | None = None) -> None:
    """The frozen base weights of a PEFT model, as a plain transformers model (adapter layers taken out)."""
    from transformers import AutoModelForCausalLM

    base = policy.get_base_model()
    state = base.state_dict() if state is None else {k.removeprefix("base_model.model."): v for k, v in state.items()}
    plain = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
    model = AutoModelForCausalLM.from_config(base.config)
    model.load_state_dict(plain, strict=True)
    model.to(next(base.parameters()).dtype).save_pretrained(target)


def save_final_value_head(value_head: nn.Module, target: Path, gathered_state: dict | None = None) -> Path:
    """``target/value_head.safetensors``; ``gathered_state`` as in :func:`save_final_model` (keys ``value_head.*``)."""
    if gathered_state is not None:
        prefix = "value_head."
        return Path(save_value_head({k[len(prefix):]: v for k, v in gathered_state.items() if k.startswith(prefix)},
                                    target))
    return Path(save_value_head(value_head, target))
