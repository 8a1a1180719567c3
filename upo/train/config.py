"""Training configuration: one dataclass, filled from defaults, then a YAML/JSON file, then flags."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from upo.train.errors import UserError

# The default run: the tiny byte-level Llama on the shipped data, DPO + UPO (readability).
DEFAULT_AUX_REWARDS = ("readability:1.0",)
TINY_MODEL_LR = 1e-3  # a randomly initialised model with a few hundred thousand parameters
PRETRAINED_LR = 1e-6  # TRL's DPOConfig default, for --model


@dataclass
class TrainConfig:
    """Every setting of ``upo-train``; field names are the flag names with ``_`` for ``-``."""

    # model and data
    model: str | None = None  # local path or HF id; None = tiny Llama from config
    model_config: Any = None  # LlamaConfig kwargs: dict, JSON string or JSON file path
    dataset: str | None = None  # None = shipped preferences.jsonl
    dataset_split: str = "train"
    max_examples: int | None = None
    max_length: int = 384
    max_prompt_length: int | None = None
    truncation: str = "keep_end"
    # objective
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid", "upo"])
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"  # TRL 1.16's DPOConfig names and defaults
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None
    use_weighting: bool = False
    aux_reward: list[str] = field(default_factory=lambda: list(DEFAULT_AUX_REWARDS))
    upo_lambda: float = 1.0
    beta_aux: float = 1.0
    omega_max: float = 20.0
    expectile: float = 0.7
    baseline: str = "value"
    # optimisation
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: TINY_MODEL_LR for the built-in model, PRETRAINED_LR for --model
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler: str = "linear"
    warmup_steps: int = 10
    max_steps: int | None = None
    epochs: float = 3.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    packing: bool = False
    precompute_ref: bool = False
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    fsdp: bool = False
    backend: str = "auto"
    device: str = "auto"
    seed: int = 0
    # bookkeeping
    output_dir: str = "./upo-output"
    resume: str | None = None
    eval_every: int = 50
    eval_fraction: float = 0.1
    save_every: int = 100
    keep_checkpoints: int = 2
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def learning_rate(self) -> float:
        """``lr``, or its default for the kind of model."""
        if self.lr is not None:
            return self.lr
        return TINY_MODEL_LR if self.model is None else PRETRAINED_LR


CHOICES = {
    "truncation": ("keep_end", "keep_start"),
    "baseline": ("value", "pair_mean", "batch_mean"),
    "f_divergence_type": ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
    "optimizer": ("adamw", "rmsprop"),
    "lr_scheduler": ("constant", "linear", "cosine"),
    "precision": ("fp32", "bf16"),
    "backend": ("auto", "triton", "torch"),
}


def field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


def load_config_file(path: str) -> dict:
    """Settings from a YAML or JSON file (keys may use ``-`` or ``_``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"config file not found: {path}")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # parse errors are user errors
        raise UserError(f"could not parse config file {path}: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of settings")
    settings = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(settings) - field_names())
    if unknown:
        raise UserError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
    return settings


def build_config(file_settings: dict, flag_settings: dict) -> TrainConfig:
    """Defaults, then the config file, then flags (flags win); values are normalised and checked."""
    merged = {**file_settings, **flag_settings}
    for key in ("loss_type", "aux_reward"):
        if isinstance(merged.get(key), str):
            merged[key] = [merged[key]]
    if isinstance(merged.get("loss_type"), list):  # also accept "sigmoid,upo"
        merged["loss_type"] = [part for item in merged["loss_type"] for part in str(item).split(",") if part]
    if isinstance(merged.get("loss_weights"), (int, float)):
        merged["loss_weights"] = [merged["loss_weights"]]
    config = TrainConfig(**merged)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    for name, allowed in CHOICES.items():
        value = getattr(config, name)
        if value not in allowed:
            raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got '{value}'")
    positive = ("max_length", "batch_size", "grad_accum", "eval_every", "save_every")
    for name in positive:
        if int(getattr(config, name)) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if config.max_steps is not None and config.max_steps < 1:
        raise UserError("--max-steps must be at least 1")
    if config.max_prompt_length is not None and config.max_prompt_length < 1:
        raise UserError("--max-prompt-length must be at least 1")
    if config.loss_weights is not None and len(config.loss_weights) != len(config.loss_type):
        raise UserError(f"--loss-weights has {len(config.loss_weights)} value(s) for "
                        f"{len(config.loss_type)} loss type(s)")
    if not config.beta > 0:
        raise UserError(f"--beta must be > 0, got {config.beta}")
    if not 0.0 <= config.label_smoothing < 0.5:
        raise UserError(f"--label-smoothing must be in [0, 0.5), got {config.label_smoothing}")
    if config.ld_alpha is not None and not 0.0 <= config.ld_alpha <= 1.0:
        raise UserError(f"--ld-alpha must be in [0, 1], got {config.ld_alpha}")
    if not 0.0 < config.expectile < 1.0:
        raise UserError(f"--expectile must be in (0, 1), got {config.expectile}")
    if not (config.beta_aux > 0 and config.omega_max > 0):
        raise UserError("--beta-aux and --omega-max must be > 0")
    if config.max_grad_norm < 0:
        raise UserError("--max-grad-norm must be >= 0 (0 disables clipping)")
    if config.lr is not None and not config.lr > 0:
        raise UserError(f"--lr must be > 0, got {config.lr}")
    if not config.loss_type:
        raise UserError("--loss-type needs at least one loss name")
