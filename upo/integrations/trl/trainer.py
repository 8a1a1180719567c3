"""``UPOTrainer``: TRL's ``DPOTrainer`` with the log-probs from upo's kernels and the loss from ``upo``.

Everything of ``DPOTrainer`` is kept (data preparation, collator, PEFT and its adapters-off
reference, ``precompute_ref_log_probs``, gradient checkpointing, evaluation, logging, saving)
except how the loss is computed: the policy's and the reference's *final hidden states* go with
the LM head's weight to ``upo.fused_loss`` / ``upo.sequence_logprobs`` (logits never exist),
and every loss ``upo.loss`` has is available. What is replaced, and why, is in docs/trl.md.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from trl import DPOTrainer
from trl.data_utils import extract_prompt
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

import upo
from upo.heads import describe_lm_head
from upo.integrations.trl.batch import (
    IGNORE_INDEX,
    AuxRewardCollator,
    aux_rewards,
    last_prompt_index,
    next_token_labels,
)
from upo.integrations.trl.config import UPOConfig, plan_loss, setting
from upo.integrations.trl.forward import causal_lm_of, run_inside_forward
from upo.integrations.trl.logit_check import check_models
from upo.integrations.trl.rewards import AUX_COLUMNS, CHOSEN_COLUMN, AuxRewards
from upo.integrations.trl.value_head import (
    ATTRIBUTE,
    attach_value_head,
    load_value_head_into,
    save_value_head,
)
from upo.pretrained import load_causal_lm, load_tokenizer, loads_without_upo
from upo.sequence_features import shared_prefix_labels
from upo.shared_prompt import (SharedPromptRows, check_masked_attention, prompt_lengths_of, share_prompt_rows,
                               shared_hidden_states)

# TRL's token-weighted metrics and the response tokens each is a mean over (chosen and rejected, or one side)
TOKEN_WEIGHTED = {"entropy": "all", "mean_token_accuracy": "chosen", "logits/chosen": "chosen",
                  "logits/rejected": "rejected"}

class UPOTrainer(DPOTrainer):
    """``DPOTrainer`` whose loss is ``upo.fused_loss``; takes ``UPOConfig`` and ``aux_reward_funcs``.

    Args: those of ``trl.DPOTrainer``, plus ``aux_reward_funcs``: names of upo's rewards
    (``"readability"``, ``"length:-0.1"``, ``"column:NAME"`` for a dataset column) or callables
    called like GRPO's reward functions (``f(prompts=[...], completions=[...], **columns) ->
    list[float]``), scored once per example while the datasets are prepared.
    """

    _tag_names = ["trl", "dpo", "upo"]

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, aux_reward_funcs=None):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = UPOConfig(f"{name.rstrip('/').split('/')[-1]}-UPO")
        self._aux_rewards = AuxRewards(aux_reward_funcs)
        self._plan = plan_loss(args, len(self._aux_rewards), self._aux_rewards.explicit_weights)
        self._value_head = None
        model, processing_class = _load_named_model(model, processing_class, args)
        _refuse_unsupported_inputs(model, train_dataset, peft_config)
        if self._plan.use_value_head and optimizers[0] is not None:
            raise ValueError("optimizers=(optimizer, ...) cannot train UPO's value head, which the trainer creates "
                             "after the optimizer was built; pass optimizer_cls_and_kwargs instead, or set "
                             "use_value_head=False")
        super().__init__(model=model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)
        if self.aux_loss_enabled:
            raise ValueError("the MoE router auxiliary loss is not computed by UPOTrainer; set "
                             "router_aux_loss_coef=0.0 to train without it")
        if self._plan.uses_aux_rewards:
            self.data_collator = AuxRewardCollator(self.data_collator)
        if setting(args, "logit_check"):
            check_models(self.model, self.ref_model, self.train_dataset, self._plan.backend, self.accelerator.autocast)
        if self._plan.use_value_head:
            self._value_head = attach_value_head(causal_lm_of(self.model))
        if setting(args, "share_prompt"):  # the shared rows need attention that takes a 4-D mask
            check_masked_attention(self.model, self.ref_model)

    # -- data: aux rewards scored once per example, kept through the collator

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if len(self._aux_rewards):
            dataset = self._with_aux_rewards(dataset, args, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _with_aux_rewards(self, dataset, args, dataset_name):
        if isinstance(dataset, IterableDataset):
            raise ValueError(f"aux_reward_funcs need a map-style Dataset (the {dataset_name} dataset is an "
                             "IterableDataset): rewards are scored once per example before training")
        if all(name in dataset.column_names for name in AUX_COLUMNS):  # already scored, or given by the user
            width = len(dataset[0][CHOSEN_COLUMN]) if len(dataset) else len(self._aux_rewards)
            if width != len(self._aux_rewards):
                raise ValueError(f"the {dataset_name} dataset's {CHOSEN_COLUMN} column holds {width} rewards "
                                 f"per example, aux_reward_funcs has {len(self._aux_rewards)}")
            return dataset
        if "prompt" not in dataset.column_names:  # implicit prompt: TRL's own extraction, done first
            dataset = dataset.map(extract_prompt, num_proc=args.dataset_num_proc,
                                  desc=f"Extracting prompt from {dataset_name} dataset")
        return dataset.map(self._aux_rewards.score, batched=True, with_indices=True, num_proc=args.dataset_num_proc,
                           desc=f"Scoring auxiliary rewards of {dataset_name} dataset")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._plan.uses_aux_rewards:
            self._signature_columns += [name for name in AUX_COLUMNS if name not in self._signature_columns]

    # -- log-probs from upo's kernels on the final hidden states

    def _shared_rows(self, inputs: dict) -> SharedPromptRows | None:
        """With ``share_prompt``, the batch's pairs as rows ``[prompt, chosen, rejected]``; else None."""
        if not setting(self.args, "share_prompt"):
            return None
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        # pad id 0: padding is attended by no real token and gathered nowhere, any id in the vocabulary will do
        return share_prompt_rows(input_ids, attention_mask.sum(dim=1),
                                 prompt_lengths_of(inputs["completion_mask"], attention_mask), pad_id=0)

    def _sequence_sums(self, labels: torch.Tensor, shared_rows: SharedPromptRows | None = None):
        """A forward body: the reference's summed completion log-probs ``(2B,)``, LD-weighted as TRL's."""
        backend, ld_alpha = self._plan.backend, self._plan.kwargs.get("ld_alpha")

        def reference_sums(causal_lm, input_ids, attention_mask):
            head = describe_lm_head(causal_lm)
            hidden = _hidden_states(head, causal_lm, input_ids, attention_mask, shared_rows)
            weight, bias = head.weight_and_bias(hidden.dtype)
            options = dict(bias=bias, backend=backend, allow_empty=True, **head.logit_options)
            sums = upo.sequence_logprobs(hidden, weight, labels.to(hidden.device), **options)[0]
            if ld_alpha is None:
                return sums
            shared = upo.sequence_logprobs(hidden, weight, shared_prefix_labels(labels).to(hidden.device),
                                           **options)[0]
            return shared + ld_alpha * (sums - shared)

        return reference_sums

    def _policy_loss(self, labels: torch.Tensor, prompt_index: torch.Tensor, loss_inputs: dict,
                     shared: SharedPromptRows | None = None):
        """A forward body: the policy's hidden states, the value head, then ``upo.fused_loss``."""
        plan = self._plan

        def policy_loss(causal_lm, input_ids, attention_mask):
            head = describe_lm_head(causal_lm)
            hidden = _hidden_states(head, causal_lm, input_ids, attention_mask, shared)
            weight, bias = head.weight_and_bias(hidden.dtype)
            kwargs = dict(loss_inputs)
            if plan.use_value_head:
                rows = torch.arange(prompt_index.numel(), device=hidden.device)
                prompt_hidden = hidden[rows, prompt_index.to(hidden.device)]
                kwargs["values_chosen"] = getattr(causal_lm, ATTRIBUTE)(prompt_hidden).float()
            return upo.fused_loss(hidden, weight, labels.to(hidden.device), bias=bias, backend=plan.backend,
                                  **head.logit_options, **kwargs)

        return policy_loss

    def compute_ref_log_probs(self, model, inputs):
        """Reference sums ``(B,)`` for chosen and rejected, from upo's kernels (also used by precompute)."""
        labels = next_token_labels(inputs["input_ids"], inputs["completion_mask"])
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):  # the reference is the policy, adapters off
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              adapter_context):
            sums = self._run_in_forward(model, self._sequence_sums(labels, self._shared_rows(inputs)), inputs)
        return sums.chunk(2, dim=0)

    def _run_in_forward(self, model, body, inputs):
        """``body`` run as ``model``'s forward, under the trainer's mixed precision: the policy's and the
        reference's log-probs take this one path. (The patched forward bypasses accelerate's wrapper, and
        with it the autocast that wrapper would have entered.)"""
        with self.accelerator.autocast():
            return run_inside_forward(model, body, inputs["input_ids"], inputs["attention_mask"])

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"]
        loss_inputs = dict(self._plan.kwargs, **aux_rewards(inputs))
        if self._plan.needs_reference:
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                reference = self.model if self.ref_model is None else self.ref_model
                ref_chosen, ref_rejected = self.compute_ref_log_probs(reference, inputs)
            loss_inputs.update(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
            if "ld_alpha" in loss_inputs:
                # The reference sums are LD-weighted already (TRL's contract of compute_ref_log_probs, and what
                # precompute caches): as their own shared part, upo's shared + a * (S - shared) leaves them as they are.
                loss_inputs.update(ref_chosen_shared_logps=ref_chosen, ref_rejected_shared_logps=ref_rejected)
        labels = next_token_labels(input_ids, completion_mask)
        body = self._policy_loss(labels, last_prompt_index(completion_mask), loss_inputs, self._shared_rows(inputs))
        output = self._run_in_forward(model, body, inputs)
        self._record_metrics(mode, output, attention_mask, labels)
        if return_outputs:  # only for compute_metrics: TRL also runs a plain forward for the logits here
            with torch.no_grad():
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return output.loss, outputs
        return output.loss

    def _record_metrics(self, mode: str, output, attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
        """TRL's metric names (``rewards/*``, ``logps/*``, token statistics) plus upo's, over all ranks: the
        token statistics weighted by each rank's response tokens (TRL gathers their sums and counts), the
        others averaged (per-pair means over equal per-rank batches)."""
        metrics = dict(output.metrics)
        if len(output.terms) > 1:  # each term's batch mean before weighting
            metrics.update({f"loss/{name}": float(term.detach()) for name, term in output.terms.items()})
        if self.accelerator.num_processes > 1:
            metrics = self._across_ranks(metrics, labels)
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def _across_ranks(self, metrics: dict, labels: torch.Tensor) -> dict:
        counts = (labels != IGNORE_INDEX).sum(dim=1).double()
        half = counts.shape[0] // 2
        tokens = {"all": counts.sum(), "chosen": counts[:half].sum(), "rejected": counts[half:].sum()}
        names = sorted(metrics)
        weights = [tokens[TOKEN_WEIGHTED[name]] if name in TOKEN_WEIGHTED else 1.0 for name in names]
        row = torch.tensor([[metrics[n] * float(w) for n, w in zip(names, weights)] + [float(w) for w in weights]],
                           dtype=torch.float64, device=self.accelerator.device)
        totals = self.accelerator.gather(row).sum(dim=0).tolist()
        sums, weight_sums = totals[:len(names)], totals[len(names):]
        return {name: (total / weight if weight > 0 else 0.0) for name, total, weight in zip(names, sums, weight_sums)}

    # -- the value head: its own learning rate, saved and restored beside the model

    def create_optimizer(self, model=None):
        head = self._value_head
        if head is None or self.optimizer is not None:
            return super().create_optimizer(model)
        head.requires_grad_(False)  # keeps it out of the model's parameter groups
        try:
            optimizer = super().create_optimizer(model)
        finally:
            head.requires_grad_(True)
        optimizer.add_param_group({"params": list(head.parameters()), "lr": setting(self.args, "value_lr"),
                                   "weight_decay": 0.0})
        return optimizer

    def _save(self, output_dir=None, state_dict=None):
        # First: save_pretrained drops the head's keys from a given state_dict in place.
        if self._value_head is not None and self.args.should_save:
            source = self._value_head if state_dict is None else state_dict
            save_value_head(source, output_dir if output_dir is not None else self.args.output_dir)
        super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self._value_head is not None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            load_value_head_into(self._value_head, resume_from_checkpoint)

    def _load_best_model(self):
        super()._load_best_model()
        if self._value_head is not None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            load_value_head_into(self._value_head, self.state.best_model_checkpoint)


def _load_named_model(model: Any, processing_class: Any, args) -> tuple[Any, Any]:
    """A model name DPOTrainer cannot load (a ``.gguf`` file, ``smollm2``) loaded by ``upo.pretrained``, in
    ``model_init_kwargs``' dtype (float32 by default, as TRL), with its tokenizer unless one is given; folders
    and hub ids stay names, for DPOTrainer to load as it does."""
    if not isinstance(model, str) or loads_without_upo(model):
        return model, processing_class
    kwargs = dict(args.model_init_kwargs or {})
    dtype = kwargs.pop("dtype", None) or "float32"
    dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"model_init_kwargs['dtype'] must be 'auto', 'float32', 'bfloat16' or 'float16' for "
                         f"model '{model}', got {dtype!r}")
    loaded = load_causal_lm(model, dtype, kwargs.pop("attn_implementation", None))
    return loaded, processing_class if processing_class is not None else load_tokenizer(model)


def _hidden_states(head, causal_lm, input_ids, attention_mask, shared: SharedPromptRows | None) -> torch.Tensor:
    """The ``(2B, T, D)`` hidden states the head consumes: of the batch's rows, or of its shared rows gathered
    back into their layout."""
    if shared is not None:
        return shared_hidden_states(head, causal_lm, shared)
    return head.hidden_states(causal_lm, input_ids, attention_mask)


def _refuse_unsupported_inputs(model: Any, train_dataset: Any, peft_config: Any) -> None:
    """What UPOTrainer cannot do yet, refused before any data is prepared."""
    if isinstance(train_dataset, Dataset):
        sample = train_dataset[0] if len(train_dataset) else {}
        if "image" in sample or "images" in sample:
            raise ValueError("vision datasets are not supported by UPOTrainer yet (the loss reads a text "
                             "model's final hidden states)")
    configs = [peft_config] if peft_config is not None else []
    if not isinstance(model, str) and is_peft_model(model):  # a name: DPOTrainer loads it, without adapters
        configs.append(model.active_peft_config)
    if any(getattr(config, "is_prompt_learning", False) for config in configs):
        raise ValueError("prompt-learning PEFT methods (prefix/prompt tuning) are not supported by UPOTrainer: "
                         "they change the inputs of the backbone; use LoRA")
