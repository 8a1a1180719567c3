"""KTO's mismatched pairs and unpaired rows inside ``upo-train``.

KTO's reference point ``z`` is estimated from mismatched prompt/completion pairs (``collate.py`` builds
them: each rank's micro-batch rotated by one, as TRL): their log-probs under the policy and the
reference are computed here without grad, inside the module's forward, and handed to the loss as
``kl_policy_logps`` / ``kl_ref_logps`` (``upo.kto_reference_point`` averages them over the ranks). With
``--precompute-ref`` the reference's are cached like the matched ones, for every mismatched pair the
run will visit (the pairs depend on the data order, so they are enumerated from the sampler).
Unpaired batches go to ``upo.unpaired_loss`` (:func:`unpaired_forward`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import upo
from upo.train.atomic import atomic_save
from upo.train.data import (DataPosition, PairSampler, PreferenceData, SequenceRows, UnpairedBatch, eval_chunks,
                            kl_keys, rows_of)
from upo.train.errors import UserError
from upo.train.hidden_states import head_inputs, prompt_hidden
from upo.train.reference import reference_batches, reference_cache_path, rows_logps
from upo.train.runtime import Runtime, barrier


def uses_mismatched_pairs(config, world_size: int) -> bool:
    """Whether the run's loss reads KTO's reference point from mismatched pairs (paired and unpaired data
    alike); ``UserError`` when a process's micro-batch is too small to mismatch anything."""
    if "kto" not in config.loss_type:
        return False
    per_process = config.batch_size // world_size
    if per_process < 2:
        raise UserError(f"--batch-size {config.batch_size} gives each of the {world_size} process(es) "
                        f"{per_process} example per micro-batch: KTO's reference point needs mismatched "
                        "prompt/completion pairs, i.e. at least 2 examples per process (as TRL)")
    return True


# ---- log-probs inside the forward -----------------------------------------------------------
def _rows_logps(module: nn.Module, causal_lm: nn.Module, rows: SequenceRows) -> torch.Tensor:
    head, hidden = head_inputs(causal_lm, rows)
    weight, bias = head.weight_and_bias(hidden.dtype)
    sums, _ = upo.sequence_logprobs(hidden, weight, rows.labels, bias=bias, cu_seqlens=rows.cu_seqlens,
                                    backend=module.backend, **head.logit_options)
    return sums


@torch.no_grad()
def reference_logps(module: nn.Module, rows: SequenceRows) -> torch.Tensor:
    """The reference's summed response log-probs of ``rows``: the frozen copy, or the policy with its LoRA
    adapters disabled (the precomputed case is read from the batch by the callers)."""
    if module.reference == "adapters":
        with module.policy.disable_adapter():
            return _rows_logps(module, module.policy, rows)
    return _rows_logps(module, module.reference, rows)


@torch.no_grad()
def mismatched_kwargs(module: nn.Module, batch) -> dict:
    """``kl_policy_logps`` and ``kl_ref_logps`` of the batch's mismatched rows (none without them)."""
    if batch.kl is None:
        return {}
    policy = _rows_logps(module, module.policy, batch.kl)
    ref = batch.ref_kl_logps if module.reference == "precomputed" else reference_logps(module, batch.kl)
    return {"kl_policy_logps": policy, "kl_ref_logps": ref}


def unpaired_forward(module: nn.Module, batch: UnpairedBatch, hidden: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, logit_options: dict) -> upo.LossOutput:
    """``upo.unpaired_loss`` of an unpaired batch from the policy's hidden states (inside the module's forward)."""
    sums, counts = upo.sequence_logprobs(hidden, weight, batch.labels, bias=bias, cu_seqlens=batch.cu_seqlens,
                                         backend=module.backend, **logit_options)
    kwargs = dict(module.loss_kwargs)
    if module.reference == "precomputed":
        kwargs["ref_logps"] = batch.ref_logps
    elif module.reference is not None:
        kwargs["ref_logps"] = reference_logps(module, batch)
    if batch.aux is not None:
        kwargs["aux_rewards"] = batch.aux
    if module.value_head is not None:
        kwargs["values"] = module.value_head(prompt_hidden(hidden, batch).detach().float()).float()
    kwargs.update(mismatched_kwargs(module, batch))
    return upo.unpaired_loss(sums, desirable=batch.desirable, lengths=counts, **kwargs)


# ---- the reference cache of the mismatched pairs ----------------------------------------------
def visited_batches(sampler: PairSampler, micro_batches: int, world_size: int) -> list[list[int]]:
    """Every rank's micro-batches of a run of ``micro_batches`` global micro-batches, in the loop's order."""
    batches, position = [], DataPosition()
    share = sampler.global_batch_size // world_size
    for _ in range(micro_batches):
        indices, position = sampler.global_batch(position)
        batches += [indices[rank * share:(rank + 1) * share] for rank in range(world_size)]
    return batches


def kl_reference_of_run(trainer, policy: nn.Module) -> dict:
    """The reference log-probs of every mismatched pair a trainer's run visits (training and evaluation)."""
    config = trainer.config
    # the data-parallel size: the processes of one model copy (--tp) or of one sequence (--cp) share a batch
    batches = visited_batches(trainer.sampler, trainer.total_steps * config.grad_accum, trainer.runtime.dp_size)
    batches += eval_chunks(trainer.eval_indices, config.batch_size, True)
    matched = reference_batches(trainer.sampler, trainer.eval_indices, True, len(trainer.data))
    cache = reference_cache_path(trainer.output_dir, policy, trainer.data, config, matched)
    return load_or_compute_kl_reference(policy, trainer.data, batches, trainer.pad_id, config, trainer.runtime,
                                        trainer.autocast_dtype, trainer.log, cache)


def load_or_compute_kl_reference(model: nn.Module, data: PreferenceData, batches: list[list[int]], pad_id: int,
                                 config, runtime: Runtime, autocast_dtype, log, cache_path: Path) -> dict:
    """``{(prompt example, response example, side): reference log-prob}`` of every mismatched row of
    ``batches``: the cached ones from ``<hash>-kl.pt`` beside the matched cache, the others computed by rank 0,
    each batch's rows together as the batch holds them (a key two batches share keeps the first's value)."""
    path = cache_path.with_name(cache_path.stem + "-kl.pt")
    sides = list(data.examples[0].responses)
    rows = [kl_keys([data.examples[i] for i in indices], config.max_length) for indices in batches]
    needed = {key for _, keys in rows for key in keys}
    if runtime.is_main:
        table = _read_kl_cache(path)
        missing = needed - table.keys()
        if missing:
            log(f"precomputing reference log-probs of {len(missing)} mismatched pairs (KTO's reference point) "
                f"-> {path}")
            was_training = model.training
            model.eval()
            for seqs, keys in rows:
                if missing.isdisjoint(keys):
                    continue
                batch_rows = rows_of(seqs, pad_id, config.packing).to(runtime.device)
                sums, _, _ = rows_logps(model, batch_rows, config.backend, autocast_dtype)
                table.update((key, value) for key, value in zip(keys, sums.tolist()) if key in missing)
                missing.difference_update(keys)
            model.train(was_training)
            keys = torch.tensor([[p, c, sides.index(side)] for p, c, side in table], dtype=torch.long)
            atomic_save({"sides": sides, "keys": keys, "values": torch.tensor(list(table.values()))}, path)
    barrier(runtime)
    table = _read_kl_cache(path)
    return {key: table[key] for key in needed}


def _read_kl_cache(path: Path) -> dict:
    """The cached table (empty when there is none, or it is damaged: it is only a cache)."""
    if not path.is_file():
        return {}
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return {(int(p), int(c), saved["sides"][int(s)]): float(v)
                for (p, c, s), v in zip(saved["keys"].tolist(), saved["values"].tolist())}
    except Exception:
        return {}
