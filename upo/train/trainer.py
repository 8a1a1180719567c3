"""The training loop behind ``upo-train``: set-up, one optimiser step, evaluation, checkpoints, outputs.

The global batch is split across ranks (``torchrun``: DDP, or FSDP2 with ``--fsdp``); rank 0
writes every output. The pieces live beside this file: data/, models.py, objective.py,
preference_model.py, reference.py, checkpoints.py, optim.py, metrics.py, plot.py.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import upo
from upo.heads import lm_head_of
from upo.train.atomic import atomic_write_text
from upo.train.checkpoints import (changed_settings, read_checkpoint, resolve_resume, rng_state, set_rng_state,
                                   trainable_state, write_checkpoint)
from upo.train.config import TrainConfig
from upo.train.data import (DataPosition, PairSampler, PreferenceBatch, PreferenceData, TokenizeSettings,
                            build_preference_data, collate, load_records, pad_token_id, split_train_eval)
from upo.train.errors import UserError
from upo.train.evaluation import implicit_reward_correlation, policy_and_reference_logps
from upo.train.final_model import save_final_model
from upo.train.metrics import (MetricMean, metrics_log_up_to, peak_memory_bytes, postfix, reward_metrics,
                               scalar_metrics)
from upo.train.models import add_lora, enable_activation_checkpointing, frozen_copy, load_policy_and_tokenizer
from upo.train.objective import (build_reward, check_loss_names, check_loss_options, loss_kwargs_from_config,
                                 needs_reference, uses_aux_objective)
from upo.train.optim import build_optimizer, build_scheduler
from upo.train.plot import plot_history
from upo.train.preference_model import PreferenceModel
from upo.train.reference import load_or_compute_reference
from upo.train.runtime import (Runtime, all_reduce_mean, all_reduce_sum, barrier, gradient_sync, setup_runtime,
                               wrap_for_processes)


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
        self.model = wrap_for_processes(self.module, self.runtime, self.config.fsdp, self.log)
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
        check_loss_options(self.config, list(self.reward.weights) if self.reward else None)

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
        return write_checkpoint({
            "step": self.state.step,
            "position": vars(self.state.position),
            "tokens_seen": self.state.tokens_seen,
            "train_seconds": self.state.train_seconds,
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "config": self.config.to_dict(),
        }, self.output_dir, self.config.keep_checkpoints)

    def _load_checkpoint(self, path: Path) -> None:
        checkpoint = read_checkpoint(path)
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
        changed = changed_settings(checkpoint.get("config", {}), self.config)
        if changed:  # allowed, but no longer an exact continuation
            self.log(f"note: resuming with changed settings ({', '.join(changed)}): "
                     "not an exact continuation of the checkpointed run")
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        self.state = TrainState(checkpoint["step"], DataPosition(**checkpoint["position"]),
                                checkpoint.get("tokens_seen", 0), checkpoint.get("train_seconds", 0.0))
        metrics_path = self.output_dir / "metrics.jsonl"
        self.history = metrics_log_up_to(metrics_path, self.state.step)
        if self.runtime.is_main and metrics_path.is_file():
            atomic_write_text("".join(json.dumps(r) + "\n" for r in self.history), metrics_path)
        self.log(f"resumed from {path} at step {self.state.step}")

    # ---- batches -----------------------------------------------------------------------
    def _batch(self, indices: list[int]) -> PreferenceBatch:
        examples = [self.data.examples[i] for i in indices]
        return collate(examples, self.pad_id, self.config.packing, self.ref_logps).to(self.runtime.device)

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
            with gradient_sync(self.model, self.runtime, micro == config.grad_accum - 1):
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
        """Does the policy's implicit reward ``(S - R) / n`` track the designer's reward over these
        examples' responses? Pearson correlation (not under FSDP: runs the bare module)."""
        examples = [self.data.examples[i] for i in indices]
        return implicit_reward_correlation(examples, self.sequence_logps(indices), self.reward.weights)

    def sequence_logps(self, indices: list[int]) -> dict[str, dict]:
        """Policy and reference log-prob sums (and token counts) of the given examples' responses.

        For analysis: the implicit reward of a response is ``beta * (policy - reference)``.
        Single-process only (it runs the bare module, not the DDP/FSDP wrapper).
        """
        examples = [self.data.examples[i] for i in indices]
        return policy_and_reference_logps(self.module, examples, self.ref_logps, self.pad_id, self.runtime.device,
                                          self.config.batch_size, self.config.backend, self.autocast_dtype)

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
                    progress.set_postfix(postfix({**last_eval, **record}), refresh=False)
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
            sharded = self.config.fsdp and self.runtime.distributed  # save the gathered copy
            save_final_model(self.module.policy, self.tokenizer, self.output_dir / "model",
                             model_state if sharded else None)
            plot_history(self.history, self.output_dir / "plot.png")
        barrier(self.runtime)
        return summary

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
