"""Training configuration: one dataclass, filled from defaults, then a YAML/JSON file, then flags; validated.

The file is read by ``config_file.py`` through the flags' own parser; here the merged settings
become a :class:`TrainConfig` and every range is checked, a bad value naming the flag (and, when
it came from the file, the file and line).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from upo.train.errors import SettingError

# The default run: the tiny byte-level Llama on the shipped data, DPO + UPO (readability).
DEFAULT_AUX_REWARDS = ("readability:1.0",)
TINY_MODEL_LR = 1e-3  # a randomly initialised model with a few hundred thousand parameters
PRETRAINED_LR = 1e-6  # TRL's DPOConfig default, for --model
# The value head starts at 0 and has one linear layer: it needs a learning rate of its own, far above a
# pretrained policy's 1e-6 (with which V barely moves and the advantage stays the raw reward).
VALUE_LR = 1e-3


@dataclass
class TrainConfig:
    """Every setting of ``upo-train``; field names are the flag names with ``_`` for ``-``."""

    # model and data
    model: str | None = None  # local path or HF id; None = tiny Llama from config
    model_config: Any = None  # LlamaConfig kwargs: dict, JSON string or JSON file path
    model_dtype: str = "fp32"  # the dtype the weights are held in (policy and reference)
    ref_model: str | None = None  # local path or HF id of another reference model; None = the initial policy
    logit_check: bool = True  # compare the fused log-probs with the model's own at start-up
    dataset: str | None = None  # None = shipped preferences.jsonl
    dataset_split: str = "train"
    max_examples: int | None = None
    max_length: int = 384
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
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
    beta_aux: float | str = 1.0  # "auto": the batch's advantage standard deviation (upo/losses/upo.py)
    omega_max: float | None = 20.0  # None: no cap
    expectile: float = 0.7
    baseline: str = "value"
    aux_normalize: str = "mean"  # UPO's likelihood term on the token-mean log-prob ("mean") or the sum
    value_lr: float = VALUE_LR  # the value head's own AdamW / RMSprop parameter group
    value_weight_decay: float = 0.0
    desirable_weight: float = 1.0  # KTO's class weights (TRL's KTOConfig names and defaults)
    undesirable_weight: float = 1.0
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
    share_prompt: bool = False  # each pair as one sequence [prompt, chosen, rejected] (upo/shared_prompt.py)
    precompute_ref: bool = False
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    fsdp: bool = False
    tp: int = 1  # tensor parallelism: processes per model copy (torchrun); tensor_parallel.py
    cp: int = 1  # context parallelism: processes per sequence (torchrun); context_parallel.py
    backend: str = "auto"
    device: str = "auto"
    seed: int = 0
    # bookkeeping
    output_dir: str = "./upo-output"
    overwrite: bool = False
    resume: str | None = None
    eval_every: int = 50
    eval_fraction: float = 0.1
    eval_dataset: str | None = None  # None: the dataset's eval_split if it has one, else eval_fraction of it
    eval_split: str = "test"
    eval_max_pairs: int | None = None
    eval_generate: int = 0  # complete this many held-out prompts at the end (generation.py); 0: off
    eval_generate_max_tokens: int = 64
    eval_generate_temperature: float = 0.0  # 0: greedy; > 0: sampled, seeded by --seed
    save_every: int = 100
    keep_checkpoints: int = 2
    max_skipped_batches: int = 0
    progress: bool = True
    # not a setting: the --config file the settings came from (the output-dir claim never removes it); not saved
    config_file: str | None = None

    def to_dict(self) -> dict:
        """The settings (``config.json``, checkpoints): every field but ``config_file``."""
        settings = dataclasses.asdict(self)
        del settings["config_file"]
        return settings

    @property
    def learning_rate(self) -> float:
        """``lr``, or its default for the kind of model."""
        if self.lr is not None:
            return self.lr
        return TINY_MODEL_LR if self.model is None else PRETRAINED_LR


CHOICES = {
    "truncation": ("keep_end", "keep_start"),
    "baseline": ("value", "pair_mean", "batch_mean"),
    "aux_normalize": ("mean", "sum"),
    "f_divergence_type": ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
    "optimizer": ("adamw", "rmsprop"),
    "lr_scheduler": ("constant", "linear", "cosine"),
    "precision": ("fp32", "bf16"),
    "model_dtype": ("fp32", "bf16", "fp16"),
    "backend": ("auto", "triton", "torch"),
}


def flag(name: str) -> str:
    """``max_length`` -> ``--max-length``."""
    return "--" + name.replace("_", "-")


# Settings only the UPO objective reads: given without 'upo' in --loss-type they would do nothing.
UPO_SETTINGS = ("aux_reward", "upo_lambda", "beta_aux", "omega_max", "expectile", "baseline", "aux_normalize",
                "value_lr", "value_weight_decay")
KTO_SETTINGS = ("desirable_weight", "undesirable_weight")
CLASS_WEIGHTED_LOSSES = ("kto", "apo_zero_unpaired")  # the losses KTO_SETTINGS weigh (TRL's KTOTrainer's)


def build_config(file_settings: dict, flag_settings: dict, sources: dict[str, str] | None = None) -> TrainConfig:
    """Defaults, then the config file, then flags (flags win); values are normalised and checked.

    ``sources`` says where each file setting came from (``run.yaml line 3``): an error about a
    setting the file gave names it.
    """
    merged = {**file_settings, **flag_settings}
    sharers = [merged.get(key, 1) for key in ("tp", "cp")]
    per_device = "(per_device_train_batch_size)" in (sources or {}).get("batch_size", "")
    if per_device and "batch_size" not in flag_settings and all(map(_is_int, sharers)) and max(sharers) > 1:
        # TRL's per-device batch is per model copy: the processes of one (--tp) or of one sequence (--cp) share it
        merged["batch_size"] //= sharers[0] * sharers[1]
    for key in ("loss_type", "aux_reward"):
        if isinstance(merged.get(key), str):
            merged[key] = [merged[key]]
    if isinstance(merged.get("loss_type"), list):  # also accept "sigmoid,upo"
        merged["loss_type"] = [part for item in merged["loss_type"] for part in str(item).split(",") if part]
    if isinstance(merged.get("loss_weights"), (int, float)):
        merged["loss_weights"] = [merged["loss_weights"]]
    config = TrainConfig(**merged)
    # A file setting at its default value changes nothing, so it is not refused as inapplicable: a run's own
    # config.json spells out every setting (desirable_weight without kto, aux_reward without upo) and must
    # reproduce the run.
    defaults = TrainConfig()
    given = set(flag_settings) | {key for key, value in file_settings.items() if value != getattr(defaults, key, None)}
    try:
        validate(config, given=given)
    except SettingError as err:
        where = (sources or {}).get(err.setting) if err.setting not in flag_settings else None
        if where:
            raise SettingError(err.setting, f"{where}: {err}") from None
        raise
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# (setting, smallest value): integers, and integers that may also be None (unset).
AT_LEAST = {"max_length": 2, "batch_size": 1, "grad_accum": 1, "eval_every": 1, "save_every": 1,
            "keep_checkpoints": 1, "warmup_steps": 0, "lora_r": 1, "lora_alpha": 1, "max_skipped_batches": 0,
            "eval_generate": 0, "eval_generate_max_tokens": 1, "tp": 1, "cp": 1}
OPTIONAL_AT_LEAST = {"max_steps": 1, "max_examples": 1, "max_prompt_length": 1, "max_completion_length": 1,
                     "eval_max_pairs": 1}
# (setting, test, what the test means): finite numbers in a range; lr may be None (its default).
NUMBER_RANGES = {
    "beta": (lambda v: v > 0, "> 0"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "upo_lambda": (lambda v: True, ""),  # any finite weight, as upo.loss takes
    "beta_aux": (lambda v: v > 0, "> 0 or auto"),
    "omega_max": (lambda v: v > 0, "> 0 (or none: no cap)"),
    "value_lr": (lambda v: v > 0, "> 0"),
    "value_weight_decay": (lambda v: v >= 0, ">= 0"),
    "desirable_weight": (lambda v: v >= 0, ">= 0"),
    "undesirable_weight": (lambda v: v >= 0, ">= 0"),
    "expectile": (lambda v: 0 < v < 1, "in (0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    "epochs": (lambda v: v > 0, "> 0"),
    "eval_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lr": (lambda v: v > 0, "> 0"),
    "ld_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "f_alpha_divergence_coef": (lambda v: True, ""),  # upo.loss checks it against the divergence
    "eval_generate_temperature": (lambda v: v >= 0, ">= 0 (0: greedy)"),
}
OPTIONAL_NUMBERS = ("lr", "ld_alpha", "omega_max")  # None: the default for the kind of model / LD-DPO off / no cap
WORD_VALUES = {"beta_aux": "auto"}  # a number setting that also takes this word


def validate(config: TrainConfig, given: set[str] = frozenset()) -> None:
    """Every setting's type and range; ``given``: the settings the user set (file or flags)."""
    for name, allowed in CHOICES.items():
        value = getattr(config, name)
        if value not in allowed:
            raise SettingError(name, f"{flag(name)} must be one of {', '.join(allowed)}, got '{value}'")
    for table, optional in ((AT_LEAST, False), (OPTIONAL_AT_LEAST, True)):
        for name, least in table.items():
            value = getattr(config, name)
            if optional and value is None:
                continue
            if not _is_int(value) or value < least:
                raise SettingError(name, f"{flag(name)} must be an integer >= {least}, got {value!r}")
    for name, (in_range, meaning) in NUMBER_RANGES.items():
        value = getattr(config, name)
        if (name in OPTIONAL_NUMBERS and value is None) or (name in WORD_VALUES and value == WORD_VALUES[name]):
            continue
        if not (_is_number(value) and math.isfinite(value) and in_range(value)):
            bound = f" {meaning}" if meaning else ""
            raise SettingError(name, f"{flag(name)} must be a finite number{bound}, got {value!r}")
    for name in ("model", "ref_model", "dataset", "eval_dataset", "output_dir", "resume"):
        if isinstance(getattr(config, name), str) and not getattr(config, name).strip():  # an unset shell variable
            raise SettingError(name, f"{flag(name)} is empty: give a path or a name, or leave it out for its default")
    if not config.loss_type:
        raise SettingError("loss_type", "--loss-type needs at least one loss name")
    if config.loss_weights is not None:
        if len(config.loss_weights) != len(config.loss_type):
            raise SettingError("loss_weights", f"--loss-weights has {len(config.loss_weights)} value(s) for "
                               f"{len(config.loss_type)} loss type(s)")
        if not all(_is_number(w) and math.isfinite(w) for w in config.loss_weights):
            raise SettingError("loss_weights", f"--loss-weights must be finite numbers, got {config.loss_weights}")
    for losses, settings in ((("upo",), UPO_SETTINGS), (CLASS_WEIGHTED_LOSSES, KTO_SETTINGS)):
        if any(loss in config.loss_type for loss in losses):
            continue
        for name in settings:
            if name in given and not (name == "aux_reward" and config.eval_generate):  # it scores generations
                also = " (or to score --eval-generate completions)" if name == "aux_reward" else ""
                raise SettingError(name, f"{flag(name)} only applies with {' or '.join(map(repr, losses))} in "
                                   f"--loss-type{also} (got: {' '.join(config.loss_type)})")
    if config.share_prompt and config.packing:
        raise SettingError("share_prompt", "--share-prompt and --packing cannot be combined: packed rows need "
                           "flash-attn varlen or one mask over the whole batch (quadratic in its tokens); use one")
    if config.share_prompt and config.tp > 1:
        raise SettingError("share_prompt", "--share-prompt is not verified with --tp yet (the 4-D mask through "
                           "the sharded attention); drop one of them")
    if config.cp > 1 and config.tp > 1:
        raise SettingError("cp", "--cp with --tp is not supported yet (a sequence split over processes of a "
                           "sharded model); use one of them")
    for name, off in (("ld_alpha", None), ("use_weighting", False)):
        if config.cp > 1 and getattr(config, name) != off:
            raise SettingError("cp", f"--cp with {flag(name)} is not supported: its per-token weights depend on "
                               "tokens that other processes hold")
    if config.cp > 1 and config.packing:
        raise SettingError("cp", "--cp with --packing is not supported: packed rows would need attention across "
                           "segment boundaries on every rank; drop --packing (--share-prompt shares the prompt)")
    if config.eval_generate and config.fsdp:
        raise SettingError("eval_generate", "--eval-generate needs the whole model in one process: not with --fsdp")
    if config.overwrite and config.resume is not None:
        raise SettingError("overwrite", "--overwrite starts the run over and --resume continues it: give one of them")
