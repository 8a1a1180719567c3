"""Reference log-probs precomputed once per dataset (``--precompute-ref``) and cached on disk.

Each pair is computed in the micro-batch training gives it (its neighbours, padding, packing, shared prompt
rows): under bf16 a model's forward depends on the batch a row sits in, so values computed in other batches
would leave the first step a few 1e-6 off exact. That holds for the first epoch and evaluation; a later
epoch reorders the pairs and reads the same values (docs/training.md, "Precision and memory").
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from upo.fused import sequence_logprobs
from upo.sequence_features import shared_prefix, shared_prefix_labels
from upo.train.atomic import atomic_save
from upo.train.config import TrainConfig
from upo.train.data import IGNORE_INDEX, PairSampler, PreferenceData, collate, eval_chunks, rows_of
from upo.train.hidden_states import head_inputs
from upo.train.runtime import Runtime, barrier

SHARED_KEYS = ("chosen_shared", "rejected_shared")


def model_signature(model: nn.Module) -> str:
    """A cheap fingerprint of the weights (per-tensor shape, sum and sum of squares)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            values = tensor.detach().double()
            stats = (tuple(values.shape), float(values.sum()), float((values * values).sum()))
            digest.update(f"{name}{stats}".encode())
    return digest.hexdigest()


def reference_cache_path(output_dir: Path, model: nn.Module, data: PreferenceData, config: TrainConfig,
                         batches: list[list[int]]) -> Path:
    """``ref_logps/<hash>.pt``, the hash covering the weights, the token ids, the length settings and the
    batches the values are computed in (:func:`reference_batches`) with their layout."""
    digest = hashlib.sha256()
    digest.update(model_signature(model).encode())
    for e in data.examples:
        digest.update(json.dumps([e.index, e.prompt_ids, *e.responses.values()]).encode())
    settings = [config.model, config.max_length, config.max_prompt_length, config.truncation, config.precision,
                config.ref_model, config.model_dtype, config.backend, config.packing, config.share_prompt, batches]
    digest.update(json.dumps(settings).encode())
    return output_dir / "ref_logps" / f"{digest.hexdigest()[:24]}.pt"


def reference_batches(sampler: PairSampler, eval_indices: list[int], mismatched: bool,
                      num_examples: int) -> list[list[int]]:
    """The micro-batches the cache computes, as the run builds them: every rank's of the first epoch, then
    evaluation's; examples neither holds (an epoch's dropped remainder, first trained in a later epoch) in
    micro-batches of their own."""
    batches = sampler.epoch_batches(0) + eval_chunks(eval_indices, sampler.global_batch_size, mismatched)
    covered = {i for batch in batches for i in batch}
    rest = [i for i in range(num_examples) if i not in covered]
    share = sampler.global_batch_size // sampler.world_size
    return batches + [rest[start:start + share] for start in range(0, len(rest), share)]


@torch.no_grad()
def rows_logps(model: nn.Module, rows, backend: str, autocast_dtype: torch.dtype | None = None,
               shared_prefix: bool = False):
    """Summed response log-probs and token counts (fp32, on CPU) of a batch's rows (``SequenceRows``, a
    ``PreferenceBatch`` or ``UnpairedBatch``: padded, packed or shared prompt rows, as the module's forward
    runs them), in the model's current mode, without grad. With ``shared_prefix`` (rows: B chosen then B
    rejected) also LD-DPO's sums over each pair's first ``min(n_c, n_r)`` response tokens (one more head pass,
    no backbone pass), else None."""
    device = rows.input_ids.device
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())
    shared = None
    with autocast:
        head, hidden = head_inputs(model, rows)
        weight, bias = head.weight_and_bias(hidden.dtype)
        options = dict(bias=bias, cu_seqlens=rows.cu_seqlens, backend=backend, **head.logit_options)
        sums, counts = sequence_logprobs(hidden, weight, rows.labels, **options)
        if shared_prefix:
            shared = sequence_logprobs(hidden, weight, _shared_prefix_labels(rows), **options)[0].float().cpu()
    return sums.float().cpu(), counts.float().cpu(), shared


def _shared_prefix_labels(rows) -> torch.Tensor:
    """The rows' labels kept on each pair's shared prefix only: padded ``[2B, T]`` or packed ``[N]``."""
    if not rows.packed:
        return shared_prefix_labels(rows.labels)
    lengths = rows.cu_seqlens.diff().long()
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    keep = rows.labels != IGNORE_INDEX
    counts = torch.zeros_like(lengths).index_add(0, seq_ids, keep.long())
    return rows.labels.masked_fill(~shared_prefix(keep, seq_ids, counts), IGNORE_INDEX)


def sequences_logps(model: nn.Module, seqs: list, pad_id: int, device: torch.device, backend: str,
                    autocast_dtype: torch.dtype | None = None, shared_prefix: bool = False):
    """:func:`rows_logps` of ``(token ids, prompt length)`` rows run as one padded batch."""
    return rows_logps(model, rows_of(seqs, pad_id, packing=False).to(device), backend, autocast_dtype, shared_prefix)


@torch.no_grad()
def logps_in_batches(model: nn.Module, examples: list, batches: list[list[int]], build_batch: Callable,
                     backend: str, autocast_dtype: torch.dtype | None = None, shared_prefix: bool = False) -> dict:
    """Per-example response log-prob sums and token counts of ``model`` (no grad, fp32, on CPU), each
    example's computed in the batch ``build_batch`` makes of the ``examples[i]`` of its entry of ``batches``
    (the first that holds it).

    Returns, per side of the examples' responses (``"chosen"``, ``"rejected"``; ``"completion"`` for
    unpaired rows), ``side`` and ``side_tokens``, each indexed by ``example.index`` (entries of
    examples not given stay 0); with ``shared_prefix`` (pairs) also ``"chosen_shared"``,
    ``"rejected_shared"``: LD-DPO's sums over each pair's first ``min(n_chosen, n_rejected)`` response tokens.
    """
    was_training = model.training
    model.eval()
    n = max((e.index for e in examples), default=-1) + 1
    sides = list(examples[0].responses) if examples else ["chosen", "rejected"]
    keys = [key for side in sides for key in (side, f"{side}_tokens")] + (list(SHARED_KEYS) if shared_prefix else [])
    result = {key: torch.zeros(n) for key in keys}
    done: set[int] = set()
    for positions in batches:
        if done.issuperset(positions):
            continue
        chunk = [examples[i] for i in positions]
        sums, counts, shared = rows_logps(model, build_batch(chunk), backend, autocast_dtype, shared_prefix)
        fresh = [k for k, i in enumerate(positions) if i not in done]
        idx = torch.tensor([chunk[k].index for k in fresh])
        for s, side in enumerate(sides):
            rows = torch.tensor(fresh) + s * len(chunk)
            result[side][idx] = sums[rows]
            result[f"{side}_tokens"][idx] = counts[rows]
            if shared is not None:
                result[f"{side}_shared"][idx] = shared[rows]
        done.update(positions)
    model.train(was_training)
    return result


def compute_sequence_logps(model: nn.Module, examples: list, pad_id: int, device: torch.device,
                           batch_size: int, backend: str, autocast_dtype: torch.dtype | None = None,
                           shared_prefix: bool = False) -> dict:
    """:func:`logps_in_batches` of ``examples`` in padded batches of ``batch_size``, in order (for analysis)."""
    batches = [list(range(start, min(start + batch_size, len(examples))))
               for start in range(0, len(examples), batch_size)]
    return logps_in_batches(model, examples, batches, lambda chunk: collate(chunk, pad_id, False).to(device),
                            backend, autocast_dtype, shared_prefix)


def load_or_compute_reference(model, data, batches: list[list[int]], pad_id, config, runtime: Runtime,
                              autocast_dtype, log) -> dict:
    """Reference log-probs from the on-disk cache, or computed by rank 0 in ``batches`` (:func:`reference_batches`)
    collated as training collates them, and written atomically."""
    path = reference_cache_path(Path(config.output_dir), model, data, config, batches)
    shared_prefix = config.ld_alpha is not None  # LD-DPO also needs the reference's shared-prefix sums
    sides = list(data.examples[0].responses) + (list(SHARED_KEYS) if shared_prefix else [])
    if runtime.is_main and path.is_file() and not _cache_is_readable(path, len(data), sides):
        log(f"note: the cached reference log-probs {path} are unreadable or lack what this run needs: "
            "computing them again")
        path.unlink()
    if runtime.is_main and not path.is_file():
        log(f"precomputing reference log-probs for {len(data)} pairs -> {path}")
        def training_batch(examples):  # make_batch's layout (KTO's mismatched rows are cached apart)
            return collate(examples, pad_id, config.packing, max_length=config.max_length,
                           share_prompt=config.share_prompt).to(runtime.device)

        values = logps_in_batches(model, data.examples, batches, training_batch, config.backend, autocast_dtype,
                                  shared_prefix=shared_prefix)
        atomic_save({side: values[side] for side in sides}, path)
    elif runtime.is_main:
        log(f"using cached reference log-probs {path}")
    barrier(runtime)
    return torch.load(path, map_location="cpu", weights_only=True)


def _cache_is_readable(path: Path, num_examples: int, sides: list[str]) -> bool:
    """A cache file that loads and holds one value per example for each of ``sides`` (it is only a cache:
    a damaged or incomplete one is recomputed, not an error)."""
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
        return all(isinstance(values.get(side), torch.Tensor) and tuple(values[side].shape) == (num_examples,)
                   for side in sides)
    except Exception:
        return False
