"""``UPOConfig``: every ``DPOConfig`` field plus upo's loss options; and the checked plan of the loss.

The plan turns a config into the keyword arguments of ``upo.fused_loss`` once, before any data
is prepared, and refuses (``ValueError`` naming the field) what upo cannot do the way TRL does:
an unknown loss name, a TRL option this version of ``upo.loss`` does not implement, an option
no selected loss reads. The final check is a dry run of ``upo.fused_loss`` on a tiny batch
built like a real one, so whatever ``upo.loss`` refuses is refused here.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig

import upo

# TRL 1.16's loss types (DPOConfig.loss_type), for the error of a name upo does not know.
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# DPOConfig fields that change TRL's numbers when not at their default: field -> (default, what it is).
# They go to upo.loss under the same name (a field upo.loss lacks is refused, never ignored).
TRL_LOSS_FIELDS = {
    "use_weighting": (False, "WPO weighting"),
    "ld_alpha": (None, "LD-DPO length weighting"),
    "f_divergence_type": ("reverse_kl", "the f-divergence of f-DPO"),
}
# UPOConfig fields that are options of upo's losses, passed only when set.
UPO_OPTION_FIELDS = ("upo_lambda", "beta_aux", "omega_max", "expectile", "aux_weights", "aux_normalize")


@dataclass
class UPOConfig(DPOConfig):
    """``DPOConfig`` plus upo's options (docs/trl.md). ``None`` means upo's default for that option."""

    upo_lambda: float | None = field(default=None, metadata={
        "help": "Weight of UPO's advantage-weighted likelihood term inside loss 'upo' (upo's default: 1.0)."})
    beta_aux: float | None = field(default=None, metadata={  # also "auto" (from Python; TrlParser reads a float)
        "help": "Temperature of UPO's advantage weights exp(A / beta_aux) (upo's default: 1.0); 'auto': each batch's "
                "advantage standard deviation."})
    omega_max: float | None = field(default=None, metadata={
        "help": "Upper clip of UPO's advantage weights (upo's default: 20.0)."})
    expectile: float | None = field(default=None, metadata={
        "help": "Expectile tau of the value loss, in (0, 1) (upo's default: 0.7)."})
    aux_weights: list[float] | None = field(default=None, metadata={
        "help": "One weight per auxiliary reward (default: the weights in the reward specs, else 1.0)."})
    aux_normalize: str | None = field(default=None, metadata={
        "help": "'mean' (per-token mean log-prob, upo's default) or 'sum' in UPO's likelihood term."})
    loss_options: dict | str | None = field(default=None, metadata={
        "help": "Any other option of upo's losses, as a dict or a JSON object, e.g. '{\"gamma\": 0.5}' for "
                "'simpo' or '{\"baseline\": \"pair_mean\"}' for 'upo'."})
    use_value_head: bool | None = field(default=None, metadata={
        "help": "Train a value head V(x) as UPO's baseline (default: on when loss_type has 'upo')."})
    value_lr: float = field(default=1e-3, metadata={
        "help": "Learning rate of the value head (its own optimizer parameter group, no weight decay)."})
    logit_check: bool = field(default=True, metadata={
        "help": "At construction, compare upo's logit-free log-probs with the model's own log_softmax(logits) "
                "on a slice of the first training example (policy and ref_model) and refuse a disagreement."})
    upo_backend: str = field(default="auto", metadata={
        "help": "upo's kernels: 'auto' (Triton on CUDA, chunked PyTorch elsewhere), 'triton' or 'torch'."})
    share_prompt: bool = field(default=False, metadata={
        "help": "Run each pair as one sequence [prompt, chosen, rejected] (the rejected response attends to the "
                "prompt, not to the chosen one): the prompt goes through the model once, the log-probs are "
                "unchanged. Needs attn_implementation 'sdpa' or 'eager'; not with padding_free."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.loss_options, str):
            try:
                self.loss_options = json.loads(self.loss_options)
            except json.JSONDecodeError as err:
                raise ValueError(f"loss_options must be a JSON object, got {self.loss_options!r} ({err})") from None
        if self.loss_options is not None and not isinstance(self.loss_options, dict):
            raise ValueError(f"loss_options must be a dict, got {type(self.loss_options).__name__}")
        if not (isinstance(self.value_lr, (int, float)) and self.value_lr > 0):
            raise ValueError(f"value_lr must be a number > 0, got {self.value_lr!r}")
        if self.share_prompt and self.padding_free:
            raise ValueError("share_prompt and padding_free cannot be combined: padding-free rows need flash-attn "
                             "varlen, which cannot express the shared prompt's mask; use one")
        if self.upo_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"upo_backend must be 'auto', 'triton' or 'torch', got {self.upo_backend!r}")


def setting(args: Any, name: str) -> Any:
    """A UPOConfig field of ``args``, or its default when ``args`` is a plain DPOConfig."""
    if hasattr(args, name):
        return getattr(args, name)
    return UPOConfig.__dataclass_fields__[name].default


@dataclass(frozen=True)
class LossPlan:
    """What the trainer passes to ``upo.fused_loss`` each step, and what it must prepare for it."""

    names: tuple[str, ...]
    kwargs: dict  # loss_type, loss_weights, beta, label_smoothing, options, token_stats
    needs_reference: bool
    uses_aux_rewards: bool
    use_value_head: bool
    backend: str


# accelerate's ParallelismConfig sizes that UPOTrainer cannot train under, and what does it instead
UNSUPPORTED_PARALLELISM = {
    "cp_size": ("accelerate's context parallelism shards each batch's sequences under upo's loss, which reads "
                "whole sequences", "upo-train --cp N (docs/context_parallel.md)"),
    "sp_size": ("DeepSpeed's sequence parallelism shards each batch's sequences under upo's loss, which reads "
                "whole sequences", "upo-train --cp N (docs/context_parallel.md)"),
    "tp_size": ("tensor parallelism hands upo's kernels a sharded LM head", "upo-train --tp N "
                "(docs/tensor_parallel.md)"),
}


def refuse_sequence_and_tensor_parallelism(parallelism_config: Any) -> None:
    """A ``parallelism_config`` that splits sequences or the model over processes: refused (``ValueError`` naming
    the field) rather than trained with a loss computed on parts it was not written for. Data parallelism and
    FSDP (``dp_replicate_size``, ``dp_shard_size``) are UPOTrainer's own."""
    for name, (why, instead) in UNSUPPORTED_PARALLELISM.items():
        size = getattr(parallelism_config, name, None) or 1
        if size > 1:
            raise ValueError(f"parallelism_config {name}={size}: not supported by UPOTrainer yet ({why}); use "
                             f"{instead}, or {name}=1")


def plan_loss(args: Any, n_rewards: int, reward_weights: list[float] | None = None) -> LossPlan:
    """The checked plan for ``args`` with ``n_rewards`` auxiliary rewards (``ValueError`` otherwise).

    ``reward_weights``: the weights given in the reward specs (``None`` when none was given).
    """
    refuse_sequence_and_tensor_parallelism(getattr(args, "parallelism_config", None))
    names = tuple(args.loss_type)
    specs = [_spec(name) for name in names]
    options = _options(args, names, reward_weights)
    kwargs = dict(loss_type=list(names), loss_weights=args.loss_weights, beta=args.beta,
                  label_smoothing=args.label_smoothing, **options)
    uses_aux = any(spec.needs_aux_rewards for spec in specs)
    if uses_aux and n_rewards == 0:
        losses = [spec.name for spec in specs if spec.needs_aux_rewards]
        raise ValueError(f"loss {losses[0]!r} needs auxiliary rewards: pass aux_reward_funcs to UPOTrainer "
                         "(names of upo's rewards, callables, or 'column:NAME' for a dataset column)")
    if n_rewards and not uses_aux:
        raise ValueError(f"aux_reward_funcs are given but no loss of loss_type {list(names)} reads them; "
                         "add 'upo' to loss_type (e.g. ['sigmoid', 'upo'])")
    use_value_head = setting(args, "use_value_head")
    if use_value_head is None:
        use_value_head = "upo" in names
    if use_value_head and "upo" not in names:
        raise ValueError("use_value_head=True needs loss 'upo' in loss_type (the value head is UPO's baseline)")
    kwargs["token_stats"] = True  # TRL's entropy, mean_token_accuracy and logits/* metrics
    plan = LossPlan(names, kwargs, any(spec.needs_reference for spec in specs), uses_aux, bool(use_value_head),
                    setting(args, "upo_backend"))
    dry_run(plan, n_rewards)
    return plan


def _spec(name: str):
    try:
        return upo.loss_spec(name)
    except ValueError:
        known = ", ".join(upo.available_losses())
        if name in TRL_LOSS_TYPES:
            raise ValueError(f"loss_type {name!r} is a TRL 1.16 loss that this version of upo does not "
                             f"implement yet; upo's losses: {known}") from None
        raise ValueError(f"loss_type {name!r} is neither a TRL 1.16 loss ({', '.join(TRL_LOSS_TYPES)}) "
                         f"nor a upo loss ({known})") from None


def _options(args: Any, names: tuple[str, ...], reward_weights: list[float] | None) -> dict:
    """upo.loss keywords from the config: TRL's loss fields, upo's option fields, ``loss_options``."""
    accepted = inspect.signature(upo.loss).parameters
    options: dict[str, Any] = {}
    for name, (default, what) in TRL_LOSS_FIELDS.items():
        value = getattr(args, name, default)
        if value == default:
            continue
        if name not in accepted:
            raise ValueError(f"{name}={value!r} ({what}) changes TRL's loss and this version of upo.loss does "
                             f"not implement it; leave {name} at its default {default!r}")
        options[name] = value
    if "f_divergence_type" in options:
        options["f_alpha_divergence_coef"] = args.f_alpha_divergence_coef
    if "discopop" in names:
        options["discopop_tau"] = args.discopop_tau
    for name in UPO_OPTION_FIELDS:
        value = setting(args, name)
        if value is not None:
            options[name] = value
    if reward_weights is not None:
        if "aux_weights" in options:
            raise ValueError("give the reward weights once: in the aux_reward_funcs specs ('readability:2.0') "
                             "or in aux_weights, not both")
        options["aux_weights"] = list(reward_weights)
    for key, value in (setting(args, "loss_options") or {}).items():
        if key in options or key in ("loss_type", "loss_weights", "beta", "label_smoothing"):
            raise ValueError(f"loss_options[{key!r}] repeats a config field; set it once")
        options[key] = value
    if "bco_pair" in names:
        options.setdefault("bco_delta", 0.0)  # TRL 1.16: no running mean, delta = 0
    return options


def dry_run(plan: LossPlan, n_rewards: int) -> None:
    """``upo.fused_loss`` with the plan's arguments on a tiny batch shaped like a real one."""
    gen = torch.Generator().manual_seed(0)
    pairs, length, width, vocab = 2, 6, 4, 11
    hidden = torch.randn(2 * pairs, length, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen)
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    labels[:, :2] = -100  # the prompt
    labels[:, -1] = -100  # the last position predicts nothing
    inputs: dict[str, Any] = {}
    if plan.needs_reference:
        ref, _ = upo.sequence_logprobs(0.5 * hidden, weight, labels, backend="torch")[:2]
        inputs.update(ref_chosen_logps=ref[:pairs], ref_rejected_logps=ref[pairs:])
        if "ld_alpha" in plan.kwargs:  # as the trainer passes them: the weighted sums are their own shared part
            inputs.update(ref_chosen_shared_logps=ref[:pairs], ref_rejected_shared_logps=ref[pairs:])
    if n_rewards:
        inputs.update(aux_rewards_chosen=torch.rand(pairs, n_rewards, generator=gen),
                      aux_rewards_rejected=torch.rand(pairs, n_rewards, generator=gen))
    if plan.use_value_head:
        inputs["values_chosen"] = torch.zeros(pairs)
    try:
        with torch.no_grad():
            upo.fused_loss(hidden, weight, labels, backend="torch", **inputs, **plan.kwargs)
    except (ValueError, TypeError) as err:
        raise ValueError(f"upo cannot run loss_type {list(plan.names)} with these settings: {err}") from err
