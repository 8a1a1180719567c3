"""Loading the policy: the built-in tiny Llama or a pretrained checkpoint, LoRA, activation checkpointing."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from upo.pretrained import load_causal_lm, load_tokenizer
from upo.train.config import TrainConfig
from upo.train.data import ByteTokenizer, encode_text
from upo.train.errors import UserError

# The default model: a byte-level Llama small enough to train in minutes on two CPU cores.
TINY_LLAMA = dict(
    vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5,
    tie_word_embeddings=False, pad_token_id=ByteTokenizer.pad_token_id,
    bos_token_id=ByteTokenizer.bos_token_id, eos_token_id=ByteTokenizer.eos_token_id,
)


def attention_implementation(device: torch.device, packing: bool) -> str:
    """flash-attn (varlen for packed rows) on CUDA when installed, SDPA otherwise."""
    if device.type == "cuda" and packing:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def check_packing_support(attn: str) -> None:
    """Packed rows need attention that respects the restarting positions: flash-attn varlen, or a
    transformers recent enough to turn such ``position_ids`` into a block-diagonal mask."""
    if attn == "flash_attention_2":
        return
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        raise UserError("--packing needs flash-attn or a newer transformers (one with "
                        "masking_utils.find_packed_sequence_indices); upgrade or drop --packing") from None


def tiny_llama_config(overrides: Any = None):
    """``LlamaConfig`` of :data:`TINY_LLAMA`, updated with a dict, a JSON string or a JSON file."""
    from transformers import LlamaConfig

    settings = dict(TINY_LLAMA)
    settings.update(_parse_model_config(overrides))
    try:
        config = LlamaConfig(**settings)
    except Exception as err:
        raise UserError(f"invalid --model-config: {' '.join(str(err).split())}") from None
    # LlamaConfig keeps unknown keys as attributes nothing reads: a typo would go unnoticed.
    unknown = sorted(set(config.to_dict()) - set(LlamaConfig().to_dict()))
    if unknown:
        raise UserError(f"--model-config: unknown LlamaConfig setting(s): {', '.join(unknown)}")
    return config


def _parse_model_config(value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = str(value)
    if Path(text).expanduser().is_file():
        text = Path(text).expanduser().read_text(encoding="utf-8")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"--model-config must be a JSON object or a JSON file, got '{value}'") from None
    if not isinstance(parsed, dict):
        raise UserError("--model-config must be a JSON object")
    return parsed


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_policy_and_tokenizer(config: TrainConfig, device: torch.device):
    """The initial policy (seeded, so every process and every resume builds the same one) and its tokenizer,
    weights in ``--model-dtype``."""
    from transformers import AutoModelForCausalLM

    attn = attention_implementation(device, config.packing)
    if config.packing:
        check_packing_support(attn)
    torch.manual_seed(config.seed)
    if config.model is None:
        model_config = tiny_llama_config(config.model_config)
        if model_config.vocab_size < ByteTokenizer.vocab_size:
            raise UserError(f"--model-config vocab_size must be at least {ByteTokenizer.vocab_size} "
                            "for the byte tokenizer")
        model = AutoModelForCausalLM.from_config(model_config, attn_implementation=attn)
        cast_parameters(model, DTYPES[config.model_dtype])
        tokenizer = ByteTokenizer()
    else:  # loaded in --model-dtype, as transformers holds it (buffers such as RoPE's frequencies stay fp32)
        model, tokenizer = _load_pretrained(config.model, attn, DTYPES[config.model_dtype], "--model")
    return model.to(device=device), tokenizer


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """The parameters in ``dtype``, as ``from_pretrained(dtype=...)`` gives them; unlike ``model.to(dtype)``,
    which also rounds fp32 buffers (RoPE's inverse frequencies in bf16 move a bf16 model's log-probs by
    tenths of a nat on SmolLM2)."""
    for parameter in model.parameters():  # each once, tied ones included
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def load_reference_model(config: TrainConfig, device: torch.device) -> tuple[nn.Module, Any]:
    """``--ref-model``, frozen, in ``--model-dtype``, and its tokenizer (None when it has none)."""
    attn = attention_implementation(device, config.packing)
    model, tokenizer = _load_pretrained(config.ref_model, attn, DTYPES[config.model_dtype], "--ref-model",
                                        tokenizer_required=False)
    model = model.to(device=device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def _load_pretrained(name: str, attn: str, dtype: torch.dtype, flag: str, tokenizer_required: bool = True):
    """A folder, hub id, ``.gguf`` file or ``smollm2`` (``upo.pretrained``); without ``tokenizer_required``
    a missing tokenizer is None (the reference scores the policy's token ids)."""
    try:
        model = load_causal_lm(name, dtype, attn)
    except ValueError as err:
        raise UserError(f"{flag}: {err}") from None
    try:
        tokenizer = load_tokenizer(name)
    except ValueError as err:
        if tokenizer_required:
            raise UserError(f"{flag}: {err}") from None
        tokenizer = None
    return model, tokenizer


def check_same_tokenizer(tokenizer, ref_tokenizer, ref_vocab: int, ref_name: str) -> None:
    """The reference scores the policy's token ids: same ids for the same text, and a vocabulary covering them."""
    if len(tokenizer) > ref_vocab:
        raise UserError(f"--ref-model {ref_name} has {ref_vocab} vocabulary entries, the tokenizer {len(tokenizer)}: "
                        "the reference must use the policy's tokenizer")
    if ref_tokenizer is None:
        return
    sample = "Preference pairs, scored twice: ünïcode 123 <|user|>\n"
    if encode_text(tokenizer, sample) != encode_text(ref_tokenizer, sample) or any(
            getattr(tokenizer, f, None) != getattr(ref_tokenizer, f, None) for f in ("eos_token_id", "bos_token_id")):
        raise UserError(f"--ref-model {ref_name} has another tokenizer than the policy (other token ids for the "
                        "same text): the reference must use the policy's tokenizer")


def add_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora needs the 'peft' package (pip install peft)") from None
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant: works with frozen inputs and LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference
