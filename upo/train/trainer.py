"""The training loop behind ``upo-train``: set-up, one optimiser step, evaluation, checkpoints, outputs.

The global batch is split across ranks (``torchrun``: DDP, or FSDP2 with ``--fsdp``; with
``--tp N`` across model copies of N ranks each, tensor_parallel.py; with ``--cp N`` each sequence across N ranks,
context_parallel.py; parallel.py sets them up); rank 0 writes every output.
The pieces live beside this file: output_dir.py (the claimed, locked folder), run_data.py and
data/, models.py, objective.py, preference_model.py, reference_choice.py, reference.py,
checkpoints.py, optim.py, signals.py (stop requests), divergence.py (non-finite steps),
evaluation.py, metrics.py, plot.py, tensor_parallel.py.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import upo
from upo.heads import describe_lm_head
from upo.train.atomic import atomic_write_text
from upo.train.checkpoints import restore_training_state, trainable_state, training_state_payload, write_checkpoint
from upo.train.config import TrainConfig
from upo.train.data import DataPosition, PairSampler, PreferenceBatch, UnpairedBatch, collate, pad_token_id
from upo.train.divergence import DivergenceGuard, is_non_finite_error, non_finite_problem
from upo.train.errors import RunStopped, UserError
from upo.train.evaluation import evaluate_pairs, implicit_and_aux_rewards, pearson, policy_and_reference_logps
from upo.train.final_model import save_final_model, save_final_value_head
from upo.train.generation import evaluate_generations
from upo.train.metrics import (MetricMean, describe_run, peak_memory_bytes, postfix, reward_metrics, run_summary,
                               scalar_metrics)
from upo.train.model_checks import check_attention, check_logits, load_checked_reference
from upo.train.models import load_policy_and_tokenizer
from upo.train.kto_pairs import uses_mismatched_pairs
from upo.train.objective import (build_reward, check_loss_names, check_loss_options, check_unpaired_objective,
                                 loss_kwargs_from_config, uses_aux_objective)
from upo.train.optim import build_optimizer, build_scheduler
from upo.train.output_dir import claim_output_dir
from upo.train.plot import plot_history
from upo.train.preference_model import PreferenceModel
from upo.train.reference_choice import prepare_reference
from upo.train.run_data import load_run_data
from upo.train.runtime import (Runtime, all_reduce_max, all_reduce_sum, barrier, check_backend, gradient_sync,
                               setup_runtime)
from upo.train.signals import StopRequests, exit_code, signal_name
from upo.train.parallel import finish_gradient_reduction, setup_process_layout, wrap_module
from upo.train.tensor_parallel import clip_gradients


@dataclass
class TrainState:
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    skipped_batches: int = 0


class Trainer:
    """Owns the model, data, optimiser and outputs of one run; :meth:`train` runs it to the end.

    Constructing it claims ``--output-dir`` (its lock) until :meth:`train` ends or :meth:`close`
    (also ``with Trainer(...) as trainer:``).
    """

    def __init__(self, config: TrainConfig, runtime: Runtime | None = None, log=None):
        self.config = config
        self.runtime = runtime or setup_runtime(config.device)
        self.output_dir = Path(config.output_dir)
        self._log = log or (lambda message: print(message, file=sys.stderr))
        self.state = TrainState()
        self.history: list[dict] = []
        self.last_eval: dict[str, float] = {}
        self.stop = StopRequests(announce=self.runtime.is_main)  # entered by train()
        self.stop_signum = 0  # the stop signal every rank agreed on at the last step (0: none)
        self.guard = DivergenceGuard(config.max_skipped_batches, self.log)
        self.last_checkpoint: tuple[int, Path | None] | None = None  # (step, path on rank 0)
        # Lock and check the output dir before anything is loaded or written; released by close().
        self.output = claim_output_dir(config, self.runtime, self.log)
        self.resume_path = self.output.resume_path
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output dir's lock (``train`` does it when it ends, however it ends)."""
        self.output.release()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- set-up ------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.runtime.is_main:
            self._log(message)

    def _setup(self) -> None:
        config = self.config
        check_backend(config.backend, self.runtime.device)
        self.split = setup_process_layout(config, self.runtime)  # --tp, --cp: the meshes; --cp's split
        self._check_objective()
        self.autocast_dtype = torch.bfloat16 if config.precision == "bf16" else None
        self.model_notes: list[str] = []  # what the start-up logit checks found
        policy, self.tokenizer = load_policy_and_tokenizer(config, self.runtime.device)
        self.pad_id = pad_token_id(self.tokenizer)
        self._prepare_data()
        self._check_logits(policy, f"--model {config.model}" if config.model else "the built-in model")
        policy, reference = prepare_reference(self, policy)
        self.module = self._build_module(policy, reference)
        self.model = wrap_module(self)
        # UPO's value head learns in a parameter group of its own, clipped on its own (its gradient must not
        # scale the policy's); read after wrapping, which may replace the parameters (FSDP).
        head = self.module.value_head
        value_ids = {id(p) for p in head.parameters()} if head is not None else set()
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.params = [p for p in trained if id(p) not in value_ids]
        self.value_params = [p for p in trained if id(p) in value_ids]
        self.optimizer = build_optimizer(self.params, config, self.value_params)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        if self.resume_path is not None:
            restore_training_state(self, self.resume_path)

    def _check_objective(self) -> None:
        """Loss and reward names fail here, before any model or data is loaded."""
        loss_types = self.config.loss_type
        check_loss_names(loss_types)
        self.reward = build_reward(self.config.aux_reward) if uses_aux_objective(loss_types) else None
        if uses_aux_objective(loss_types) and self.reward is None:
            raise UserError("loss type 'upo' needs at least one --aux-reward (e.g. readability:1.0)")
        self.mismatched = uses_mismatched_pairs(self.config, self.runtime.dp_size)  # KTO's reference point
        check_loss_options(self.config, list(self.reward.weights) if self.reward else None)

    def _check_format(self, unpaired: bool) -> None:
        self.unpaired = unpaired
        if unpaired and self.config.share_prompt:
            raise UserError("--share-prompt needs paired data (prompt/chosen/rejected): an unpaired row has one "
                            "completion, so there is no second response to share its prompt with")
        if unpaired:
            check_unpaired_objective(self.config, list(self.reward.weights) if self.reward else None)

    def _prepare_data(self) -> None:
        config = self.config
        run_data = load_run_data(config, self.tokenizer, self.reward, self.log, self._check_format)
        self.data, self.train_indices, self.eval_indices = run_data.data, run_data.train_indices, run_data.eval_indices
        self.sampler = PairSampler(self.train_indices, config.batch_size, config.seed, self.runtime.dp_rank,
                                   self.runtime.dp_size)
        self.total_steps = self._total_steps()

    def _load_reference(self, policy: nn.Module) -> nn.Module:
        return load_checked_reference(policy, self.tokenizer, self.config, self.runtime, self._check_logits)

    def _check_logits(self, model: nn.Module, what: str) -> None:
        """Checked at load; said when the run starts (a set-up error stays the only line)."""
        self.model_notes.append(check_logits(model, what, self.data.examples[:1], self.pad_id, self.config,
                                             self.runtime))

    def _build_module(self, policy: nn.Module, reference) -> "PreferenceModel":
        config = self.config
        value_head = None
        if config.baseline == "value" and uses_aux_objective(config.loss_type):
            value_head = upo.ValueHead(describe_lm_head(policy).hidden_size).to(self.runtime.device)
        loss_kwargs = loss_kwargs_from_config(config, list(self.reward.weights) if self.reward else None,
                                              self.unpaired)
        check_attention(config, policy, reference)  # what --share-prompt and --cp need of it
        module = PreferenceModel(policy, value_head, reference, loss_kwargs, config.backend, self.autocast_dtype,
                                 self.split)
        return module.train()

    def _total_steps(self) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        per_epoch = self.sampler.batches_per_epoch / self.config.grad_accum
        return max(1, math.ceil(self.config.epochs * per_epoch))

    # ---- checkpoints -------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        """The module holds shards (FSDP, --tp): its full state is gathered by a collective."""
        return self.runtime.distributed and (self.config.fsdp or self.runtime.tp > 1)

    def _state_dicts(self) -> tuple[dict, dict]:
        """Full (unsharded) model and optimiser state; collective under FSDP and --tp."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_state_dict(self.module, self.optimizer, options=options)
        return trainable_state(self.module, self.config.lora), self.optimizer.state_dict()

    def save_checkpoint(self, states: tuple[dict, dict] | None = None) -> Path | None:
        """Write ``checkpoints/checkpoint-<step>.pt`` atomically (rank 0); collective under FSDP."""
        model_state, optim_state = states or self._state_dicts()
        path = None
        if self.runtime.is_main:
            path = write_checkpoint(training_state_payload(self, model_state, optim_state), self.output_dir,
                                    self.config.keep_checkpoints)
        self.last_checkpoint = (self.state.step, path)
        return path

    # ---- batches -----------------------------------------------------------------------
    def make_batch(self, indices: list[int]) -> PreferenceBatch | UnpairedBatch:
        """The batch of these examples (with KTO, their mismatched rows too), on the run's device."""
        examples = [self.data.examples[i] for i in indices]
        return collate(examples, self.pad_id, self.config.packing, self.ref_logps, kl=self.mismatched,
                       max_length=self.config.max_length, share_prompt=self.config.share_prompt
                       ).to(self.runtime.device)

    # ---- one optimiser step ------------------------------------------------------------
    def train_step(self) -> dict[str, float] | None:
        """Forward/backward over ``grad_accum`` micro-batches, then one optimiser step.

        Returns the step's metrics, or None when its loss or gradient was not finite and the
        batch was skipped (``--max-skipped-batches``; otherwise that raises a :class:`UserError`).
        One all-reduce tells every rank whether any rank saw a stop signal or a non-finite number.
        """
        config = self.config
        self.model.train()
        started = time.perf_counter()
        accumulated, tokens, losses, rows, forward_error = MetricMean(), 0, [], [], None
        for micro in range(config.grad_accum):
            rows += self.sampler.global_batch(self.state.position)[0]
            indices, self.state.position = self.sampler.next_batch(self.state.position)
            if forward_error is not None:
                continue  # the step is lost, but its data is consumed: positions stay those of whole steps
            batch = self.make_batch(indices)
            with gradient_sync(self.model, self.runtime, micro == config.grad_accum - 1):
                try:
                    out = self.model(batch)
                except ValueError as err:  # the library refuses diverged (NaN/inf) activations or weights
                    if not is_non_finite_error(err):
                        raise
                    forward_error = str(err)
                    continue
                (out.loss / config.grad_accum).backward()
            values = {**scalar_metrics(out), **reward_metrics(batch, self.data.reward_names)}
            losses.append(values["loss"])
            accumulated.add(values, batch.num_examples)
            tokens += batch.num_tokens
        # A max norm of 0 disables clipping; the norm is still logged.
        max_norm = config.max_grad_norm or float("inf")
        finish_gradient_reduction(self.params + self.value_params, self.runtime, config.fsdp)
        grad_norm = clip_gradients(self.params, max_norm, self.runtime)
        value_grad_norm = clip_gradients(self.value_params, max_norm, self.runtime) if self.value_params else None
        problem = non_finite_problem(losses, grad_norm if value_grad_norm is None else grad_norm + value_grad_norm,
                                     forward_error)
        signum, any_problem = all_reduce_max([float(self.stop.signum), float(problem is not None)], self.runtime)
        self.stop_signum = int(signum)
        if any_problem:
            self.optimizer.zero_grad(set_to_none=True)
            last = self.last_checkpoint[1] if self.last_checkpoint else None
            self.guard.handle(self.state.step + 1, problem or "a non-finite loss or gradient on another process",
                              self.data.where(rows), last)
            self.state.skipped_batches = self.guard.skipped
            return None
        self.optimizer.step()
        lrs = self.scheduler.get_last_lr()  # the policy's group, then the value head's
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

        metrics = accumulated.all_reduced(self.runtime)
        tokens = int(all_reduce_sum(tokens, self.runtime)) // self.runtime.batch_sharers  # they share a batch
        elapsed = time.perf_counter() - started
        self.state.tokens_seen += tokens
        self.state.train_seconds += elapsed
        metrics.update({
            "step": self.state.step, "epoch": self.state.position.epoch, "lr": lrs[0],
            "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / max(elapsed, 1e-9),
            "peak_memory_bytes": peak_memory_bytes(self.runtime.device),
        })
        if value_grad_norm is not None:
            metrics.update({"value/grad_norm": value_grad_norm, "value/lr": lrs[1]})
        return metrics

    def evaluate(self, indices: list[int] | None = None) -> dict[str, float]:
        """Pair-weighted mean metrics over the held-out split (every rank evaluates all of it)."""
        return evaluate_pairs(self, self.eval_indices if indices is None else indices)

    def implicit_reward_correlation(self, indices: list[int]) -> float | None:
        """Does the policy's implicit reward ``(S - R) / n`` track the designer's reward over these
        examples' responses? Pearson correlation (not under FSDP: runs the bare module)."""
        examples = [self.data.examples[i] for i in indices]
        return pearson(*implicit_and_aux_rewards(examples, self.sequence_logps(indices), self.reward.weights))

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
        """Run to ``total_steps``; write metrics, eval, checkpoints, summary, plot. Returns the summary.

        A stop signal ends it after the step in progress with a checkpoint, raising
        :class:`RunStopped`; the output dir's lock is released however it ends.
        """
        progress = metrics_file = None
        try:
            with StopRequests(announce=self.runtime.is_main) as self.stop:
                if self.runtime.is_main:  # the run claims its folder: from here on it holds a run
                    atomic_write_text(json.dumps(self.config.to_dict(), indent=2) + "\n",
                                      self.output_dir / "config.json")
                self.log(describe_run(self))
                for note in self.model_notes:
                    self.log(note)
                progress, metrics_file = self._progress_bar(), self._open_metrics()
                while self.state.step < self.total_steps:
                    record = self.train_step()
                    if record is not None:
                        self._after_step(record, metrics_file, progress)
                    if self.stop_signum and self.state.step < self.total_steps:
                        raise self._stopped()
                # A signal during the last step or the final outputs: they are finished, not interrupted.
                states = self._state_dicts()
                self.save_checkpoint(states)
                return self._finish(states[0])
        finally:
            if progress is not None:
                progress.close()
            if metrics_file is not None:
                metrics_file.close()
            self.close()

    def _after_step(self, record: dict, metrics_file, progress) -> None:
        """Evaluation when due, the metrics line, the periodic checkpoint, the progress bar."""
        config, step = self.config, self.state.step
        if step % config.eval_every == 0 or step == self.total_steps:
            evaluation = self.evaluate()
            if step == self.total_steps and config.eval_generate:
                evaluation.update(evaluate_generations(self))
            if evaluation:
                self.last_eval = evaluation
                record.update({f"eval/{k}": v for k, v in evaluation.items()})
        self.history.append(record)
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if step % config.save_every == 0 and step < self.total_steps:
            self.save_checkpoint()
        if progress is not None:
            progress.update(1)
            last_eval = {f"eval/{k}": v for k, v in self.last_eval.items()}
            progress.set_postfix(postfix({**last_eval, **record}), refresh=False)

    def _stopped(self) -> RunStopped:
        """Checkpoint the last finished step (unless just saved) for the stop every rank agreed on."""
        if self.last_checkpoint is None or self.last_checkpoint[0] != self.state.step:
            self.save_checkpoint()
        name = signal_name(self.stop_signum)
        message = (f"stopped by {name} after step {self.state.step} of {self.total_steps}: checkpoint "
                   f"{self.last_checkpoint[1]} written; continue with --resume auto")
        return RunStopped(message, exit_code(self.stop_signum))

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
            sharded = self.sharded  # save the gathered copy
            save_final_model(self.module.policy, self.tokenizer, self.output_dir / "model",
                             model_state if sharded else None)
            if self.module.value_head is not None:
                save_final_value_head(self.module.value_head, self.output_dir / "model",
                                      model_state if sharded else None)
            plot_history(self.history, self.output_dir / "plot.png")
        barrier(self.runtime)
        return summary

    def summary(self) -> dict:
        return run_summary(self)
