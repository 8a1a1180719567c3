"""``--tp N``: tensor parallelism over the ``tp`` dimension of a ``("dp", "tp")`` device mesh.

``torchrun --nproc-per-node W -m upo.train --tp N``: the W processes form ``W / N`` model copies
(the ``dp`` dimension) of ``N`` processes each (the ``tp`` dimension). Within a copy:

* the LM head is sharded over the vocabulary (``ColwiseParallel``: its weight a ``Shard(0)``
  DTensor), which the fused kernels take as it is (each rank scores its shard, the log-probs are
  merged exactly); its output layout is ``Replicate``, so the model's *own* forward (the start-up
  logit check, ``--eval-generate``) still returns whole logits;
* the decoder is sharded by the model's own transformers plan (``config.base_model_tp_plan``,
  ``"colwise"``/``"rowwise"`` entries) applied with PyTorch's ``parallelize_module`` when every
  sharded dimension (and the attention heads) divides by N; otherwise it is replicated, with a note;
* every rank of a copy sees the same batch (the data sampler's rank and size are the ``dp``
  coordinate and size), and gradients are averaged over ``dp`` by one all-reduce per step
  (DDP cannot hold unevenly sharded DTensor parameters).

Why PyTorch's ``parallelize_module`` and not transformers' ``from_pretrained(..., tp_plan="auto")``:
the trainer builds or loads the model first (and copies it as the reference), and transformers'
own TP is a loading path whose module and layer classes changed between the 5.x releases; the
plan strings it reads (``base_model_tp_plan``) are stable and map onto PyTorch's public styles.
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.distributed as dist
from torch import nn

from upo.heads import describe_lm_head
from upo.heads.errors import unwrap
from upo.heads.weights import LinearWeights
from upo.train.errors import UserError
from upo.train.runtime import check_processes_per_group
from upo_kernels.vocab_parallel import local_shard


def check_tp(config, world_size: int, is_main: bool = True) -> None:
    """``--tp``: a divisor of the process count, without --fsdp or --lora (one line, exit 2)."""
    tp = config.tp
    if tp == 1:
        return
    check_processes_per_group("--tp", tp, f"needs {tp} processes per model copy", world_size, is_main)
    quiet = not is_main  # every rank raises it; rank 0 says it
    for flag, given, why in (("--fsdp", config.fsdp, "FSDP2 over the data-parallel processes of a sharded "
                              "model is not supported yet; use --tp alone"),
                             ("--lora", config.lora, "LoRA layers around sharded linear layers are not "
                              "supported; train the full model or drop --tp")):
        if given:
            raise UserError(f"--tp {tp} with {flag}: {why}", reported_by_main=quiet)


def setup_mesh(runtime, tp: int) -> None:
    """The ``("dp", "tp")`` mesh on ``runtime`` (``runtime.tp``, ``runtime.mesh``); nothing for ``tp`` 1."""
    if tp == 1:
        return
    from torch.distributed.device_mesh import init_device_mesh

    runtime.tp = tp
    runtime.mesh = init_device_mesh(runtime.device.type, (runtime.world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    assert runtime.mesh["dp"].get_local_rank() == runtime.dp_rank


# ---- the model ---------------------------------------------------------------------------
def _styles():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def backbone_plan(model: nn.Module, tp: int) -> tuple[nn.Module | None, dict, str]:
    """``(decoder, {module pattern: style}, "")`` from the model's ``base_model_tp_plan``, or
    ``(None, {}, why not)`` when it has none or cannot be sharded ``tp`` ways."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if not plan or not isinstance(decoder, nn.Module):
        return None, {}, f"{type(base).__name__} has no transformers tensor-parallel plan (base_model_tp_plan)"
    styles = _styles()
    other = sorted({style for style in plan.values() if style not in styles})
    if other:
        return None, {}, f"its plan uses styles other than colwise/rowwise ({', '.join(other)})"
    for attribute in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, attribute, None)
        if isinstance(heads, int) and heads % tp:
            return None, {}, f"{attribute} {heads} is not divisible by {tp}"
    matched = 0
    for name, module in decoder.named_modules():
        for pattern, style in plan.items():
            if not _matches(name, pattern):
                continue
            if not isinstance(module, nn.Linear):
                return None, {}, f"{name} ({type(module).__name__}) is not an nn.Linear"
            size = module.out_features if style == "colwise" else module.in_features
            if size % tp:
                side = "outputs" if style == "colwise" else "inputs"
                return None, {}, f"{name} has {size} {side}, not divisible by {tp}"
            matched += 1
    if not matched:
        return None, {}, "its tensor-parallel plan matches none of its modules"
    return decoder, {pattern: styles[style]() for pattern, style in plan.items()}, ""


def _matches(name: str, pattern: str) -> bool:
    parts, atoms = name.split("."), pattern.split(".")
    return len(parts) == len(atoms) and all(fnmatch.fnmatchcase(p, a) for p, a in zip(parts, atoms))


def parallelize(model: nn.Module, mesh, tp: int) -> str:
    """Shard ``model`` over ``mesh`` (its LM head over the vocabulary; its decoder by its own plan, or
    replicated). Returns the line that says what was done."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    head = describe_lm_head(model)
    if head.logit_map.vocab is not None:
        raise UserError(f"--tp {tp}: {head.name} keeps only the first {head.logit_map.vocab} of its head's outputs "
                        "as logits, which a vocabulary-sharded head cannot do; drop --tp")
    if not (isinstance(head.head, nn.Linear) and isinstance(head.weights, LinearWeights)):
        raise UserError(f"--tp {tp}: {head.name}'s LM head ({head.weights.kind}) is not a linear layer that "
                        "can be sharded over the vocabulary; drop --tp")
    if _tied(model, head.head):
        raise UserError(f"--tp {tp}: {head.name} ties its LM head to its input embeddings, which --tp does not "
                        "shard; drop --tp (or untie the weights)")
    decoder, plan, why_not = backbone_plan(model, tp)
    if decoder is not None:
        parallelize_module(decoder, mesh, plan)
    # The head module itself (whatever its name): its weight Shard(0), whole logits out of its own forward.
    head_style = ColwiseParallel(output_layouts=Replicate(), use_local_output=True)
    parallelize_module(head.head, mesh, head_style)
    rows = head.head.weight.to_local().shape[0]
    what = (f"decoder sharded by its transformers plan ({len(plan)} patterns)" if decoder is not None else
            f"decoder replicated on every rank ({why_not})")
    return (f"{'note: ' if decoder is None else ''}--tp {tp}: LM head sharded over the vocabulary "
            f"({rows} of {head.vocab_size} rows on this rank), {what}")


def parallelize_run(trainer) -> None:
    """Shard the trainer's policy and its frozen reference model (if it holds one) over the ``tp`` mesh,
    then check the policy's logits again through the sharded head (the same kernels training runs)."""
    runtime, module = trainer.runtime, trainer.module
    mesh, tp = runtime.mesh["tp"], runtime.tp
    trainer.model_notes.append(parallelize(module.policy, mesh, tp))
    if isinstance(module.reference, nn.Module):
        parallelize(module.reference, mesh, tp)
    trainer._check_logits(module.policy, f"the policy under --tp {tp}")
    trainer.model_notes[-1] = f"under --tp {tp}, " + trainer.model_notes[-1]


def _tied(model: nn.Module, head: nn.Module) -> bool:
    embeddings = unwrap(model).get_input_embeddings() if hasattr(unwrap(model), "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight is not None and weight is getattr(head, "weight", None)


# ---- gradients -------------------------------------------------------------------------------
def average_gradients(params: list[torch.Tensor], runtime) -> None:
    """Under --tp, the mean of the gradients over the ``dp`` dimension (one all-reduce of all of them);
    nothing for one copy, nor without --tp (DDP averages them, FSDP reduce-scatters them)."""
    if runtime.tp == 1 or runtime.dp_size == 1:
        return
    grads = [local_shard(p.grad) for p in params if p.grad is not None]
    if not grads:
        return
    with torch.no_grad():
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=runtime.mesh["dp"].get_group())
        flat /= runtime.dp_size
        start = 0
        for g in grads:
            g.copy_(flat[start:start + g.numel()].view_as(g))
            start += g.numel()


def clip_gradients(params: list[torch.Tensor], max_norm: float, runtime) -> float:
    """The gradients' norm, after clipping them to ``max_norm`` (``clip_grad_norm_``, DTensor-aware under --tp)."""
    if runtime.tp == 1:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return clip_grad_norm(params, max_norm, runtime)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, runtime) -> float:
    """``torch.nn.utils.clip_grad_norm_`` for parameters of which some are DTensor shards: the norm of the
    whole gradient (the shards' squares summed over ``tp``), every gradient scaled alike on every rank."""
    from torch.distributed.tensor import DTensor, Shard

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    with torch.no_grad():
        sharded = [g for g in grads if isinstance(g, DTensor) and any(isinstance(x, Shard) for x in g.placements)]
        whole = [local_shard(g) for g in grads if not any(g is s for s in sharded)]
        squares = torch.zeros(2, dtype=torch.float64)
        for k, group in enumerate(([local_shard(g) for g in sharded], whole)):
            for g in group:
                squares[k] += torch.linalg.vector_norm(g.double()) ** 2
        if sharded:
            shard_sum = squares[:1].clone()
            dist.all_reduce(shard_sum, group=runtime.mesh["tp"].get_group())
            squares[0] = shard_sum[0]
        total = float(squares.sum().sqrt())
        coefficient = max_norm / (total + 1e-6)
        if math.isfinite(total) and coefficient < 1.0:
            for g in grads:
                local_shard(g).mul_(coefficient)
    return total
