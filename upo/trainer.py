"""The training loop behind ``upo-train``: policy + reference, fused logit-free loss, checkpoints.

One step runs the policy's *backbone* (never its LM head) once over the chosen and rejected
sequences together and hands the final hidden states with ``lm_head.weight`` to
:func:`upo.fused_loss`, so ``[tokens, vocab]`` logits never exist. The reference model is a
frozen copy of the initial policy (or the policy with LoRA adapters disabled), run under
``no_grad``; or its log-probs are precomputed once and cached on disk.

Multi-process training goes through the standard engine only: ``torchrun`` sets
``WORLD_SIZE``, we call ``init_process_group`` and wrap the model with DDP (or FSDP2's
``fully_shard``). The global batch is split across ranks; rank 0 writes every output.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import upo
from upo.config import TrainConfig
from upo.data import (
    ByteTokenizer,
    DataPosition,
    PairSampler,
    PreferenceBatch,
    PreferenceData,
    TokenizeSettings,
    UserError,
    build_preference_data,
    collate,
    load_records,
    pad_token_id,
    split_train_eval,
)

# The default model: a byte-level Llama small enough to train in minutes on two CPU cores.
TINY_LLAMA = dict(
    vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5,
    tie_word_embeddings=False, pad_token_id=ByteTokenizer.pad_token_id,
    bos_token_id=ByteTokenizer.bos_token_id, eos_token_id=ByteTokenizer.eos_token_id,
)
CHECKPOINT_PATTERN = "checkpoint-*.pt"


# --------------------------------------------------------------------------------------
# Distributed context
# --------------------------------------------------------------------------------------
@dataclass
class Runtime:
    """Device and process-group facts for this process."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device_choice: str) -> Runtime:
    """Pick the device and, under ``torchrun`` (WORLD_SIZE > 1), join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_choice == "auto":
        device_choice = "cuda" if torch.cuda.is_available() else "cpu"
    if device_choice.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device_choice}: CUDA is not available on this machine")
    try:
        device = torch.device(device_choice)
    except RuntimeError:
        raise UserError(f"--device: unknown device '{device_choice}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Runtime(device, dist.get_rank(), dist.get_world_size(), local_rank)
    return Runtime(device)


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        torch.distributed.barrier()


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
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
        return LlamaConfig(**settings)
    except Exception as err:
        raise UserError(f"invalid --model-config: {str(err).splitlines()[0]}") from None


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


def load_policy_and_tokenizer(config: TrainConfig, device: torch.device):
    """The initial policy (seeded, so every process and every resume builds the same one) and its tokenizer."""
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
        tokenizer = ByteTokenizer()
    else:
        model, tokenizer = _load_pretrained(config.model, attn)
    return model.to(device=device, dtype=torch.float32), tokenizer


def _load_pretrained(name: str, attn: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise UserError(f"model not found: {name}")

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn, dtype=torch.float32)
    except Exception as err:  # missing path, no network, unknown architecture: user-facing
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load model '{name}': {message}") from None
    return model, tokenizer


def backbone_of(causal_lm: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (also through a PEFT wrapper)."""
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        decoder = getattr(base, "model", None)
    if decoder is None:
        raise UserError(f"cannot find the backbone of {type(base).__name__} (no .model / get_decoder())")
    return decoder


def lm_head_of(causal_lm: nn.Module) -> nn.Module:
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    head = base.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UserError(f"{type(base).__name__} has no linear LM head")
    return head


def logit_options(causal_lm: nn.Module) -> dict:
    """Logit scaling/soft-capping some architectures apply after the LM head (Cohere, Gemma 2)."""
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    cfg = base.config
    return {"logit_scale": float(getattr(cfg, "logit_scale", None) or 1.0),
            "softcap": getattr(cfg, "final_logit_softcapping", None)}


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


def backbone_hidden(causal_lm: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """Final hidden states: ``[2B, T, D]`` padded, ``[N, D]`` packed."""
    out = backbone_of(causal_lm)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[0] if batch.packed else hidden


def head_weight_and_bias(head: nn.Module, dtype: torch.dtype):
    """LM-head weight/bias in the hidden states' dtype (bf16 autocast leaves them fp32)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if weight.dtype != dtype:
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return weight, bias


# --------------------------------------------------------------------------------------
# The module that computes the loss (the unit DDP/FSDP wraps)
# --------------------------------------------------------------------------------------
class PreferenceModel(nn.Module):
    """Policy (+ optional value head) whose ``forward(batch)`` returns :class:`upo.LossOutput`.

    The whole loss lives inside ``forward`` so that DDP's and FSDP's hooks see every use of the
    parameters, the LM head's included. The reference model is deliberately *not* a submodule:
    it is frozen, must not be synchronised, sharded, optimised or saved.
    """

    def __init__(self, policy: nn.Module, value_head: nn.Module | None, reference: nn.Module | str | None,
                 loss_kwargs: dict, backend: str, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        # A frozen model, "adapters" (LoRA disabled), "precomputed" (in the batch) or None;
        # a plain attribute, hidden from nn.Module bookkeeping.
        self.__dict__["reference"] = reference
        self.loss_kwargs = loss_kwargs
        self.backend = backend
        self.autocast_dtype = autocast_dtype
        self.logit_options = logit_options(policy)

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def forward(self, batch: PreferenceBatch):
        device = batch.input_ids.device
        with self._autocast(device):
            hidden = backbone_hidden(self.policy, batch)
            weight, bias = head_weight_and_bias(lm_head_of(self.policy), hidden.dtype)
            kwargs = dict(self.loss_kwargs)
            kwargs.update(self._reference_kwargs(batch))
            kwargs.update(self._aux_kwargs(batch, hidden))
            return upo.fused_loss(hidden, weight, batch.labels, bias=bias, cu_seqlens=batch.cu_seqlens,
                                  backend=self.backend, **self.logit_options, **kwargs)

    def _reference_kwargs(self, batch: PreferenceBatch) -> dict:
        if self.reference is None:
            return {}
        if self.reference == "precomputed":
            return {"ref_chosen_logps": batch.ref_chosen_logps, "ref_rejected_logps": batch.ref_rejected_logps}
        with torch.no_grad():
            if self.reference == "adapters":
                with self.policy.disable_adapter():
                    ref_hidden = backbone_hidden(self.policy, batch)
                head = lm_head_of(self.policy)
            else:
                ref_hidden = backbone_hidden(self.reference, batch)
                head = lm_head_of(self.reference)
            ref_weight, ref_bias = head_weight_and_bias(head, ref_hidden.dtype)
        return {"ref_hidden": ref_hidden, "ref_weight": ref_weight.detach(),
                "ref_bias": None if ref_bias is None else ref_bias.detach()}

    def _aux_kwargs(self, batch: PreferenceBatch, hidden: torch.Tensor) -> dict:
        kwargs: dict[str, Any] = {}
        if batch.aux_chosen is not None:
            kwargs["aux_rewards_chosen"] = batch.aux_chosen
            kwargs["aux_rewards_rejected"] = batch.aux_rejected
        if self.value_head is not None:
            values = self.value_head(prompt_hidden(hidden, batch).detach().float()).float()
            kwargs["values_chosen"] = values
            kwargs["values_rejected"] = values  # same prompt, same baseline
        return kwargs


def prompt_hidden(hidden: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
    """``[B, D]``: each pair's hidden state at its last prompt token (chosen sequence)."""
    if batch.packed:
        return hidden[batch.prompt_last_index]
    rows = torch.arange(batch.prompt_last_index.numel(), device=hidden.device)
    return hidden[rows, batch.prompt_last_index]


def loss_kwargs_from_config(config: TrainConfig, reward_weights: list[float] | None) -> dict:
    """The ``upo.loss`` options that stay fixed over training (UPO options only with ``upo``)."""
    kwargs: dict[str, Any] = {
        "loss_type": list(config.loss_type) if len(config.loss_type) > 1 else config.loss_type[0],
        "beta": config.beta,
        "label_smoothing": config.label_smoothing,
    }
    if config.loss_weights is not None:
        kwargs["loss_weights"] = list(config.loss_weights)
    if uses_aux_objective(config.loss_type):
        kwargs.update(upo_lambda=config.upo_lambda, beta_aux=config.beta_aux, omega_max=config.omega_max,
                      expectile=config.expectile, baseline=config.baseline)
        if reward_weights:
            kwargs["aux_weights"] = list(reward_weights)
    return kwargs


def check_loss_names(loss_types: list[str]) -> None:
    known = list(upo.available_losses())
    unknown = [name for name in loss_types if name not in known]
    if unknown:
        raise UserError(f"unknown loss type '{unknown[0]}' (available: {', '.join(known)})")
    if len(set(loss_types)) != len(loss_types):
        raise UserError(f"--loss-type lists a loss twice: {' '.join(loss_types)}")


def uses_aux_objective(loss_types: list[str]) -> bool:
    return "upo" in loss_types


def needs_reference(loss_types: list[str]) -> bool:
    """Whether any selected loss reads reference log-probs (SimPO, ORPO, NLL, UPO alone do not).

    An unknown name counts as needing one (:func:`check_loss_names` reports it first).
    """

    def reads_reference(name: str) -> bool:
        try:
            return upo.loss_spec(name).needs_reference
        except ValueError:
            return True

    return any(reads_reference(name) for name in loss_types)


# --------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------
def build_reward(specs: list[str]):
    """A ``CombinedReward`` from ``name:weight`` / ``column:NAME:weight`` specs (None if no specs)."""
    if not specs:
        return None
    from upo import rewards

    try:
        return rewards.CombinedReward.from_specs(list(specs))
    except (KeyError, ValueError) as err:
        message = err.args[0] if err.args else str(err)
        raise UserError(f"bad --aux-reward: {message}") from None


# --------------------------------------------------------------------------------------
# Reference log-probs, precomputed once and cached
# --------------------------------------------------------------------------------------
def model_signature(model: nn.Module) -> str:
    """A cheap fingerprint of the weights (per-tensor shape, sum and sum of squares)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            values = tensor.detach().double()
            stats = (tuple(values.shape), float(values.sum()), float((values * values).sum()))
            digest.update(f"{name}{stats}".encode())
    return digest.hexdigest()


def reference_cache_path(output_dir: Path, model: nn.Module, data: PreferenceData, config: TrainConfig) -> Path:
    """``ref_logps/<hash>.pt``, the hash covering the weights, the token ids and the length settings."""
    digest = hashlib.sha256()
    digest.update(model_signature(model).encode())
    for e in data.examples:
        digest.update(json.dumps([e.index, e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
    settings = [config.model, config.max_length, config.max_prompt_length, config.truncation, config.precision]
    digest.update(json.dumps(settings).encode())
    return output_dir / "ref_logps" / f"{digest.hexdigest()[:24]}.pt"


@torch.no_grad()
def compute_sequence_logps(model: nn.Module, examples: list, pad_id: int, device: torch.device,
                           batch_size: int, backend: str, autocast_dtype: torch.dtype | None = None) -> dict:
    """Per-example response log-prob sums and token counts of ``model`` (no grad, fp32, on CPU).

    Returns ``{"chosen", "rejected", "chosen_tokens", "rejected_tokens"}``, each indexed by
    ``example.index`` (entries of examples not given stay 0).
    """
    from upo.fused import sequence_logprobs

    was_training = model.training
    model.eval()
    n = max((e.index for e in examples), default=-1) + 1
    result = {key: torch.zeros(n) for key in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}
    options = logit_options(model)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate(chunk, pad_id, packing=False).to(device)
        autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            hidden = backbone_hidden(model, batch)
            weight, bias = head_weight_and_bias(lm_head_of(model), hidden.dtype)
            sums, counts = sequence_logprobs(hidden, weight, batch.labels, bias=bias, backend=backend, **options)
        idx = torch.tensor([e.index for e in chunk])
        sums, counts = sums.float().cpu(), counts.float().cpu()
        result["chosen"][idx], result["rejected"][idx] = sums[:len(chunk)], sums[len(chunk):]
        result["chosen_tokens"][idx], result["rejected_tokens"][idx] = counts[:len(chunk)], counts[len(chunk):]
    model.train(was_training)
    return result


def load_or_compute_reference(model, data, pad_id, config, runtime: Runtime, autocast_dtype, log) -> dict:
    """Reference log-probs from the on-disk cache, or computed by rank 0 and written atomically."""
    path = reference_cache_path(Path(config.output_dir), model, data, config)
    if runtime.is_main and not path.is_file():
        log(f"precomputing reference log-probs for {len(data)} pairs -> {path}")
        values = compute_sequence_logps(model, data.examples, pad_id, runtime.device, config.batch_size,
                                        config.backend, autocast_dtype)
        atomic_save({"chosen": values["chosen"], "rejected": values["rejected"]}, path)
    elif runtime.is_main:
        log(f"using cached reference log-probs {path}")
    barrier(runtime)
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def checkpoint_step(path: Path) -> int:
    match = re.search(r"checkpoint-(\d+)\.pt$", str(path))
    return int(match.group(1)) if match else -1


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(glob.glob(str(output_dir / "checkpoints" / CHECKPOINT_PATTERN)),
                   key=lambda p: checkpoint_step(Path(p)))
    return Path(found[-1]) if found else None


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """``auto``: the latest checkpoint in the output dir (or none: a fresh start)."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume).expanduser()
    if path.is_dir():  # an output dir, or its checkpoints/ folder
        found = latest_checkpoint(path) or (latest_checkpoint(path.parent) if path.name == "checkpoints" else None)
        if found is None:
            raise UserError(f"--resume {resume}: no checkpoint in that folder")
        return found
    if not path.is_file():
        raise UserError(f"--resume: checkpoint not found: {resume}")
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: PreferenceModel, lora: bool) -> dict:
    """The module's state; with LoRA only the trained tensors (the base is reloaded from --model)."""
    state = model.state_dict()
    if lora:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {name: value for name, value in state.items() if name in trainable}
    return {name: value.detach().cpu().clone() for name, value in state.items()}


# --------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------
def build_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.RMSprop(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def build_scheduler(optimizer, config: TrainConfig, total_steps: int):
    warmup = max(0, config.warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if config.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------
def scalar_metrics(out) -> dict[str, float]:
    """Flatten a ``LossOutput`` into named floats: total loss, each term, each metric."""
    values = {"loss": _to_float(out.loss)}
    for name, value in (getattr(out, "terms", None) or {}).items():
        values[f"loss/{name}"] = _to_float(value)
    for name, value in (getattr(out, "metrics", None) or {}).items():
        number = _to_float(value)
        if number is not None:
            values[name] = number
    return {k: v for k, v in values.items() if v is not None}


def _to_float(value) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean()) if value.numel() else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def reward_metrics(batch: PreferenceBatch, names: list[str]) -> dict[str, float]:
    """Batch means of each auxiliary reward, unweighted: ``aux/<name>/chosen|rejected``."""
    if batch.aux_chosen is None:
        return {}
    values = {}
    for k, name in enumerate(names):
        values[f"aux/{name}/chosen"] = float(batch.aux_chosen[:, k].mean())
        values[f"aux/{name}/rejected"] = float(batch.aux_rejected[:, k].mean())
    return values


class MetricMean:
    """Pair-weighted running means of named metrics."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, values: dict[str, float], weight: float) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.weight += weight

    def means(self) -> dict[str, float]:
        return {name: total / max(self.weight, 1e-12) for name, total in self.sums.items()}


def all_reduce_mean(values: dict[str, float], runtime: Runtime) -> dict[str, float]:
    """Average named scalars across ranks (names sorted so every rank packs the same vector)."""
    if not runtime.distributed or not values:
        return values
    names = sorted(values)
    vector = torch.tensor([values[n] for n in names], dtype=torch.float64)
    torch.distributed.all_reduce(vector)
    return {n: float(v) / runtime.world_size for n, v in zip(names, vector)}


def all_reduce_sum(value: float, runtime: Runtime) -> float:
    if not runtime.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return float(tensor)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA ``max_memory_allocated``, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except ImportError:  # not Unix
        return 0


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    tokens_seen: int = 0
    train_seconds: float = 0.0


class Trainer:
    """Owns the model, data, optimiser and outputs of one run; :meth:`train` runs it to the end."""

    def __init__(self, config: TrainConfig, runtime: Runtime | None = None, log=None):
        self.config = config
        self.runtime = runtime or setup_runtime(config.device)
        self.output_dir = Path(config.output_dir)
        self._log = log or (lambda message: print(message, file=sys.stderr))
        self.state = TrainState()
        self.history: list[dict] = []
        self.last_eval: dict[str, float] = {}
        self._setup()

    # ---- set-up ------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.runtime.is_main:
            self._log(message)

    def _setup(self) -> None:
        config = self.config
        self._check_objective()
        self.autocast_dtype = torch.bfloat16 if config.precision == "bf16" else None
        policy, self.tokenizer = load_policy_and_tokenizer(config, self.runtime.device)
        self.pad_id = pad_token_id(self.tokenizer)
        self._prepare_data()
        policy, reference = self._prepare_reference(policy)
        self.module = self._build_module(policy, reference)
        self.model = self._wrap(self.module)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.resume_path = resolve_resume(config.resume, self.output_dir)
        if self.resume_path is not None:
            self._load_checkpoint(self.resume_path)

    def _check_objective(self) -> None:
        """Loss and reward names fail here, before any model or data is loaded."""
        loss_types = self.config.loss_type
        check_loss_names(loss_types)
        self.reward = build_reward(self.config.aux_reward) if uses_aux_objective(loss_types) else None
        if uses_aux_objective(loss_types) and self.reward is None:
            raise UserError("loss type 'upo' needs at least one --aux-reward (e.g. readability:1.0)")

    def _prepare_data(self) -> None:
        config = self.config
        self.data = self._load_data()
        self.train_indices, self.eval_indices = split_train_eval(len(self.data), config.eval_fraction, config.seed)
        self.sampler = PairSampler(self.train_indices, config.batch_size, config.seed, self.runtime.rank,
                                   self.runtime.world_size)
        self.total_steps = self._total_steps()

    def _prepare_reference(self, policy: nn.Module) -> tuple[nn.Module, nn.Module | str | None]:
        """Fix the reference from the *initial* policy (before a checkpoint is loaded), then add LoRA.

        Returns the policy and the reference: a frozen copy, ``"adapters"`` (LoRA disabled),
        ``"precomputed"`` (log-probs cached in ``self.ref_logps``) or None (reference-free losses).
        """
        config = self.config
        self.ref_logps = None
        reference: nn.Module | str | None = None
        if not needs_reference(config.loss_type):
            if config.precompute_ref:
                self.log("note: --precompute-ref is ignored: the selected losses use no reference")
        elif config.precompute_ref:
            self.ref_logps = load_or_compute_reference(policy, self.data, self.pad_id, config, self.runtime,
                                                       self.autocast_dtype, self.log)
            reference = "precomputed"
        elif config.lora:
            reference = "adapters"
        else:
            reference = frozen_copy(policy)
        if config.gradient_checkpointing:
            enable_activation_checkpointing(policy)
        if config.lora:
            policy = add_lora(policy, config)
        return policy, reference

    def _build_module(self, policy: nn.Module, reference) -> "PreferenceModel":
        config = self.config
        value_head = None
        if config.baseline == "value" and uses_aux_objective(config.loss_type):
            value_head = upo.ValueHead(lm_head_of(policy).weight.shape[1]).to(self.runtime.device)
        loss_kwargs = loss_kwargs_from_config(config, list(self.reward.weights) if self.reward else None)
        module = PreferenceModel(policy, value_head, reference, loss_kwargs, config.backend, self.autocast_dtype)
        return module.train()

    def _load_data(self) -> PreferenceData:
        records = load_records(self.config.dataset, self.config.dataset_split)
        settings = TokenizeSettings(self.config.max_length, self.config.max_prompt_length, self.config.truncation)
        return build_preference_data(records, self.tokenizer, settings, reward=self.reward,
                                     max_examples=self.config.max_examples)

    def _total_steps(self) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        per_epoch = self.sampler.batches_per_epoch / self.config.grad_accum
        return max(1, math.ceil(self.config.epochs * per_epoch))

    def _wrap(self, module: PreferenceModel) -> nn.Module:
        """DDP (or FSDP2 with ``--fsdp``) when distributed, the bare module otherwise."""
        runtime = self.runtime
        if self.config.fsdp and not runtime.distributed:
            self.log("note: --fsdp has no effect in a single process")
        if not runtime.distributed:
            return module
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard

            if isinstance(module.reference, nn.Module):
                self.log("note: with --fsdp every process holds a full reference copy; "
                         "--precompute-ref or --lora avoid it")

            for layer in getattr(backbone_of(module.policy), "layers", []):
                fully_shard(layer)
            fully_shard(module)
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    # ---- checkpoints -------------------------------------------------------------------
    def _state_dicts(self) -> tuple[dict, dict]:
        """Full (unsharded) model and optimiser state; collective under FSDP."""
        if self.config.fsdp and self.runtime.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_state_dict(self.module, self.optimizer, options=options)
        return trainable_state(self.module, self.config.lora), self.optimizer.state_dict()

    def save_checkpoint(self, states: tuple[dict, dict] | None = None) -> Path | None:
        """Write ``checkpoints/checkpoint-<step>.pt`` atomically (rank 0); collective under FSDP."""
        model_state, optim_state = states or self._state_dicts()
        if not self.runtime.is_main:
            return None
        path = self.output_dir / "checkpoints" / f"checkpoint-{self.state.step:06d}.pt"
        atomic_save({
            "step": self.state.step,
            "position": vars(self.state.position),
            "tokens_seen": self.state.tokens_seen,
            "train_seconds": self.state.train_seconds,
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "config": self.config.to_dict(),
        }, path)
        self._prune_checkpoints()
        return path

    def _prune_checkpoints(self) -> None:
        found = sorted(glob.glob(str(self.output_dir / "checkpoints" / CHECKPOINT_PATTERN)),
                       key=lambda p: checkpoint_step(Path(p)))
        for old in found[:-max(1, self.config.keep_checkpoints)]:
            os.remove(old)

    def _load_checkpoint(self, path: Path) -> None:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise UserError(f"could not read checkpoint {path}: {str(err).splitlines()[0]}") from None
        if self.config.fsdp and self.runtime.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.module, self.optimizer, model_state_dict=checkpoint["model"],
                           optim_state_dict=checkpoint["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            missing, unexpected = self.module.load_state_dict(checkpoint["model"], strict=not self.config.lora)
            if unexpected:
                raise UserError(f"checkpoint {path} does not match the model (unexpected: {unexpected[0]})")
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        self._note_changed_settings(checkpoint.get("config", {}))
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        self.state = TrainState(checkpoint["step"], DataPosition(**checkpoint["position"]),
                                checkpoint.get("tokens_seen", 0), checkpoint.get("train_seconds", 0.0))
        self._restore_history()
        self.log(f"resumed from {path} at step {self.state.step}")

    def _note_changed_settings(self, saved: dict) -> None:
        """Resuming with other data or batch settings is allowed but no longer an exact continuation."""
        keys = ("dataset", "max_examples", "seed", "batch_size", "grad_accum", "eval_fraction", "max_length",
                "max_prompt_length", "truncation", "packing", "loss_type", "beta", "lr", "optimizer")
        changed = [k for k in keys if k in saved and saved[k] != getattr(self.config, k)]
        if changed:
            self.log(f"note: resuming with changed settings ({', '.join(changed)}): "
                     "not an exact continuation of the checkpointed run")

    def _restore_history(self) -> None:
        """Keep the metrics logged up to the checkpoint; later lines belong to the lost steps."""
        path = self.output_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("step", 0) <= self.state.step:
                kept.append(record)
        self.history = kept
        if self.runtime.is_main:
            atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), path)

    # ---- batches -----------------------------------------------------------------------
    def _batch(self, indices: list[int]) -> PreferenceBatch:
        examples = [self.data.examples[i] for i in indices]
        return collate(examples, self.pad_id, self.config.packing, self.ref_logps).to(self.runtime.device)

    def _no_sync(self, last_micro_step: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if last_micro_step or not self.runtime.distributed:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            return _fsdp_no_sync(self.model)
        return contextlib.nullcontext()

    # ---- one optimiser step ------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """Forward/backward over ``grad_accum`` micro-batches, then one optimiser step."""
        config = self.config
        self.model.train()
        started = time.perf_counter()
        accumulated, tokens = MetricMean(), 0
        for micro in range(config.grad_accum):
            indices, self.state.position = self.sampler.next_batch(self.state.position)
            batch = self._batch(indices)
            with self._no_sync(micro == config.grad_accum - 1):
                out = self.model(batch)
                (out.loss / config.grad_accum).backward()
            accumulated.add({**scalar_metrics(out), **reward_metrics(batch, self.data.reward_names)},
                            batch.num_pairs)
            tokens += batch.num_tokens
        # A max norm of 0 disables clipping; the norm is still logged.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm or float("inf"))
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

        metrics = all_reduce_mean(accumulated.means(), self.runtime)
        tokens = int(all_reduce_sum(tokens, self.runtime))
        elapsed = time.perf_counter() - started
        self.state.tokens_seen += tokens
        self.state.train_seconds += elapsed
        metrics.update({
            "step": self.state.step, "epoch": self.state.position.epoch, "lr": lr,
            "grad_norm": float(grad_norm), "tokens": tokens, "tokens_per_s": tokens / max(elapsed, 1e-9),
            "peak_memory_bytes": peak_memory_bytes(self.runtime.device),
        })
        return metrics

    @torch.no_grad()
    def evaluate(self, indices: list[int] | None = None) -> dict[str, float]:
        """Pair-weighted mean metrics over the held-out split (every rank evaluates all of it)."""
        indices = self.eval_indices if indices is None else indices
        if not indices:
            return {}
        self.model.eval()
        means = MetricMean()
        for start in range(0, len(indices), self.config.batch_size):
            batch = self._batch(indices[start:start + self.config.batch_size])
            values = {**scalar_metrics(self.model(batch)), **reward_metrics(batch, self.data.reward_names)}
            means.add(values, batch.num_pairs)
        self.model.train()
        results = means.means()
        if self.reward is not None and not (self.config.fsdp and self.runtime.distributed):
            correlation = self.implicit_reward_correlation(indices)
            if correlation is not None:
                results["aux/implicit_reward_corr"] = correlation
        return results

    def implicit_reward_correlation(self, indices: list[int]) -> float | None:
        """Pearson correlation, over the responses of ``indices``, between the policy's per-token
        implicit reward ``(S - R) / n`` and the combined auxiliary reward: does the policy's own
        notion of reward track the designer's objective? (Not under FSDP: runs the bare module.)"""
        logps = self.sequence_logps(indices)
        policy, reference = logps["policy"], logps["reference"]
        weights = torch.tensor(self.reward.weights)
        implicit, aux = [], []
        for i in indices:
            example = self.data.examples[i]
            for side in ("chosen", "rejected"):
                tokens = max(float(policy[f"{side}_tokens"][i]), 1.0)
                implicit.append(float(policy[side][i] - reference[side][i]) / tokens)
                aux.append(float(torch.tensor(getattr(example, f"aux_{side}")) @ weights))
        values = torch.tensor([implicit, aux], dtype=torch.float64)
        if len(implicit) < 4 or bool((values.std(dim=1) == 0).any()):
            return None  # undefined or meaningless (e.g. while policy == reference)
        return float(torch.corrcoef(values)[0, 1])

    @torch.no_grad()
    def sequence_logps(self, indices: list[int]) -> dict[str, dict]:
        """Policy and reference log-prob sums (and token counts) of the given examples' responses.

        For analysis: the implicit reward of a response is ``beta * (policy - reference)``.
        Single-process only (it runs the bare module, not the DDP/FSDP wrapper).
        """
        examples = [self.data.examples[i] for i in indices]
        args = (self.pad_id, self.runtime.device, self.config.batch_size, self.config.backend, self.autocast_dtype)
        policy = compute_sequence_logps(self.module.policy, examples, *args)
        reference = self.module.reference
        if reference == "precomputed":
            ref = {side: self.ref_logps[side] for side in ("chosen", "rejected")}
        elif reference == "adapters":
            with self.module.policy.disable_adapter():
                ref = compute_sequence_logps(self.module.policy, examples, *args)
        elif reference is not None:
            ref = compute_sequence_logps(reference, examples, *args)
        else:
            ref = {side: torch.zeros_like(policy[side]) for side in ("chosen", "rejected")}
        return {"policy": policy, "reference": ref}

    # ---- the loop ----------------------------------------------------------------------
    def train(self) -> dict:
        """Run to ``total_steps``; write metrics, eval, checkpoints, summary, plot. Returns the summary."""
        config = self.config
        if self.runtime.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json.dumps(config.to_dict(), indent=2) + "\n", self.output_dir / "config.json")
        self.log(self._describe())
        progress = self._progress_bar()
        metrics_file = self._open_metrics()
        try:
            while self.state.step < self.total_steps:
                record = self.train_step()
                if self.state.step % config.eval_every == 0 or self.state.step == self.total_steps:
                    evaluation = self.evaluate()
                    if evaluation:
                        self.last_eval = evaluation
                        record.update({f"eval/{k}": v for k, v in evaluation.items()})
                self.history.append(record)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if self.state.step % config.save_every == 0 and self.state.step < self.total_steps:
                    self.save_checkpoint()
                if progress is not None:
                    progress.update(1)
                    last_eval = {f"eval/{k}": v for k, v in self.last_eval.items()}
                    progress.set_postfix(_postfix({**last_eval, **record}), refresh=False)
        except KeyboardInterrupt:
            if not (self.config.fsdp and self.runtime.distributed):  # gathering shards needs every rank
                self.log(f"interrupted at step {self.state.step}; saving a checkpoint")
                self.save_checkpoint()
            raise
        finally:
            if progress is not None:
                progress.close()
            if metrics_file is not None:
                metrics_file.close()
        states = self._state_dicts()
        self.save_checkpoint(states)
        return self._finish(states[0])

    def _describe(self) -> str:
        n_params = sum(p.numel() for p in self.module.policy.parameters())
        n_train = sum(p.numel() for p in self.params)
        c = self.config
        return (f"upo-train: {c.model or 'tiny byte-level Llama'} ({n_params:,} params, {n_train:,} trained), "
                f"{len(self.train_indices)} train / {len(self.eval_indices)} eval pairs, "
                f"loss {'+'.join(c.loss_type)}, {self.total_steps} steps of {c.batch_size}x{c.grad_accum} pairs, "
                f"{self.runtime.world_size} process(es) on {self.runtime.device}")

    def _progress_bar(self):
        if not (self.config.progress and self.runtime.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.state.step, desc="upo-train", unit="step",
                    dynamic_ncols=True, mininterval=0.5, file=sys.stderr)

    def _open_metrics(self):
        if not self.runtime.is_main:
            return None
        mode = "a" if self.resume_path is not None else "w"
        return open(self.output_dir / "metrics.jsonl", mode, encoding="utf-8")

    def _finish(self, model_state: dict) -> dict:
        summary = self.summary()
        if self.runtime.is_main:
            atomic_write_text(json.dumps(summary, indent=2) + "\n", self.output_dir / "summary.json")
            self._save_final_model(model_state)
            plot_history(self.history, self.output_dir / "plot.png")
        barrier(self.runtime)
        return summary

    def _save_final_model(self, model_state: dict) -> None:
        """The trained policy in Hugging Face format (``model/``), loadable with ``from_pretrained``
        (with ``--lora``: the adapters, loadable with ``peft``)."""
        from transformers.utils import logging as hf_logging

        target = self.output_dir / "model"
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # ours is the only progress bar
        try:
            if self.config.fsdp and self.runtime.distributed:  # the module holds shards: save the gathered copy
                prefix = "policy."
                policy_state = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
                self.module.policy.save_pretrained(target, state_dict=policy_state)
            else:
                self.module.policy.save_pretrained(target)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(target)

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        bookkeeping = {"step", "epoch", "tokens", "lr", "peak_memory_bytes"}
        train_keys = [k for k in last if not k.startswith("eval/") and k not in bookkeeping]
        recent = self.history[-10:]
        smoothed = {k: float(np.mean([r[k] for r in recent if k in r])) for k in train_keys
                    if isinstance(last.get(k), (int, float))}
        first_loss = self.history[0]["loss"] if self.history else None
        return {
            "steps": self.state.step,
            "epochs": self.state.position.epoch + self.state.position.index / max(1, len(self.train_indices)),
            "train_pairs": len(self.train_indices),
            "eval_pairs": len(self.eval_indices),
            "truncated_prompts": self.data.truncated_prompts,
            "truncated_responses": self.data.truncated_responses,
            "aux_rewards": self.data.reward_names,
            "first_loss": first_loss,
            "train": smoothed,  # mean of the last 10 steps
            "eval": self.last_eval,
            "tokens_seen": self.state.tokens_seen,
            "train_seconds": self.state.train_seconds,
            "tokens_per_s": self.state.tokens_seen / max(self.state.train_seconds, 1e-9),
            "peak_memory_bytes": peak_memory_bytes(self.runtime.device),
            "world_size": self.runtime.world_size,
            "output_dir": str(self.output_dir),
        }


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


POSTFIX_KEYS = (("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
                ("eval/rewards/accuracies", "eval_acc"))


def _postfix(record: dict) -> dict:
    """The progress bar's live numbers."""
    return {label: f"{record[key]:.3f}" for key, label in POSTFIX_KEYS if key in record}


# --------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------
PLOT_PANELS = (
    ("loss", ("loss", "eval/loss")),
    ("preference accuracy", ("rewards/accuracies", "eval/rewards/accuracies")),
    ("reward margin", ("rewards/margins", "eval/rewards/margins")),
    ("UPO auxiliary term", ("aux/advantage_mean", "aux/weight_mean", "value/loss",
                            "eval/aux/implicit_reward_corr")),
)


def plot_history(history: list[dict], path: Path) -> None:
    """``plot.png``: train (lines) and eval (dots) curves of the main metrics, with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = {k for record in history for k in record}
    panels = [(title, [k for k in names if k in keys]) for title, names in PLOT_PANELS]
    panels = [(title, names) for title, names in panels if names]
    if not panels:
        panels = [("loss", ["loss"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            points = [(r["step"], r[name]) for r in history if name in r]
            if not points:
                continue
            steps, values = zip(*points)
            style = "o-" if name.startswith("eval/") else "-"
            ax.plot(steps, values, style, markersize=3, linewidth=1.2, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
