"""Reference log-probs precomputed once per dataset (``--precompute-ref``) and cached on disk."""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from upo.fused import sequence_logprobs
from upo.sequence_features import shared_prefix_labels
from upo.train.atomic import atomic_save
from upo.train.config import TrainConfig
from upo.train.data import PreferenceData, rows_of
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


def reference_cache_path(output_dir: Path, model: nn.Module, data: PreferenceData, config: TrainConfig) -> Path:
    """``ref_logps/<hash>.pt``, the hash covering the weights, the token ids and the length settings."""
    digest = hashlib.sha256()
    digest.update(model_signature(model).encode())
    for e in data.examples:
        digest.update(json.dumps([e.index, e.prompt_ids, *e.responses.values()]).encode())
    settings = [config.model, config.max_length, config.max_prompt_length, config.truncation, config.precision,
                config.ref_model, config.model_dtype]
    digest.update(json.dumps(settings).encode())
    return output_dir / "ref_logps" / f"{digest.hexdigest()[:24]}.pt"


@torch.no_grad()
def sequences_logps(model: nn.Module, seqs: list, pad_id: int, device: torch.device, backend: str,
                    autocast_dtype: torch.dtype | None = None, shared_prefix: bool = False):
    """Summed response log-probs and token counts (fp32, on CPU) of ``(token ids, prompt length)`` rows,
    run as one padded batch in the model's current mode, without grad. With ``shared_prefix`` (rows: B chosen
    then B rejected) also LD-DPO's sums over each pair's first ``min(n_c, n_r)`` response tokens (one more
    head pass, no backbone pass), else None."""
    batch = rows_of(seqs, pad_id, packing=False).to(device)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())
    shared = None
    with autocast:
        head, hidden = head_inputs(model, batch)
        weight, bias = head.weight_and_bias(hidden.dtype)
        sums, counts = sequence_logprobs(hidden, weight, batch.labels, bias=bias, backend=backend,
                                         **head.logit_options)
        if shared_prefix:
            shared, _ = sequence_logprobs(hidden, weight, shared_prefix_labels(batch.labels), bias=bias,
                                          backend=backend, **head.logit_options)
            shared = shared.float().cpu()
    return sums.float().cpu(), counts.float().cpu(), shared


@torch.no_grad()
def compute_sequence_logps(model: nn.Module, examples: list, pad_id: int, device: torch.device,
                           batch_size: int, backend: str, autocast_dtype: torch.dtype | None = None,
                           shared_prefix: bool = False) -> dict:
    """Per-example response log-prob sums and token counts of ``model`` (no grad, fp32, on CPU).

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
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        seqs = [(e.prompt_ids + e.responses[side], len(e.prompt_ids)) for side in sides for e in chunk]
        sums, counts, shared = sequences_logps(model, seqs, pad_id, device, backend, autocast_dtype, shared_prefix)
        idx = torch.tensor([e.index for e in chunk])
        for k, side in enumerate(sides):
            result[side][idx] = sums[k * len(chunk):(k + 1) * len(chunk)]
            result[f"{side}_tokens"][idx] = counts[k * len(chunk):(k + 1) * len(chunk)]
            if shared is not None:
                result[f"{side}_shared"][idx] = shared[k * len(chunk):(k + 1) * len(chunk)]
    model.train(was_training)
    return result


def load_or_compute_reference(model, data, pad_id, config, runtime: Runtime, autocast_dtype, log) -> dict:
    """Reference log-probs from the on-disk cache, or computed by rank 0 and written atomically."""
    path = reference_cache_path(Path(config.output_dir), model, data, config)
    shared_prefix = config.ld_alpha is not None  # LD-DPO also needs the reference's shared-prefix sums
    sides = list(data.examples[0].responses) + (list(SHARED_KEYS) if shared_prefix else [])
    if runtime.is_main and path.is_file() and not _cache_is_readable(path, len(data), sides):
        log(f"note: the cached reference log-probs {path} are unreadable or lack what this run needs: "
            "computing them again")
        path.unlink()
    if runtime.is_main and not path.is_file():
        log(f"precomputing reference log-probs for {len(data)} pairs -> {path}")
        values = compute_sequence_logps(model, data.examples, pad_id, runtime.device, config.batch_size,
                                        config.backend, autocast_dtype, shared_prefix=shared_prefix)
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
