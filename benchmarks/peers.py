"""One adapter per implementation, each turning the shared inputs into a uniform step.

``build(peer, inputs, loss_kind)`` returns ``step()`` -> ``(loss, S)``: the scalar loss (mean
over pairs, autograd graph attached to ``inputs["hidden"]`` and ``inputs["weight"]``) and the
per-sequence log-prob sums ``S`` [2B] fp32 when the implementation exposes them (else None).
The harness differentiates ``loss`` with ``torch.autograd.grad``.

``loss_kind`` is ``"dpo"`` (sigmoid DPO against precomputed reference sums) or ``"upo"``
(``loss_type=["sigmoid", "upo"]`` with designer rewards and the default pair-mean baseline).
Every peer that yields per-token or per-sequence log-probs feeds the same loss head; Liger
computes its DPO loss itself (and cannot do UPO).

Peers that are not installed (or need CUDA on a CPU run) report why through
``availability(peer, device)`` and are skipped, never faked.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import types

import torch
import torch.nn.functional as F

from benchmarks.common import format_env

# name -> (label, loss kinds supported, needs CUDA)
PEERS = {
    "naive": ("naive PyTorch (logits -> float log_softmax -> gather)", ("dpo", "upo"), False),
    "trl_selective": ("TRL selective_log_softmax over materialised logits", ("dpo", "upo"), False),
    "trl_chunked": ("TRL ChunkedLogProbFunction (DPOTrainer's fused LM head)", ("dpo", "upo"), False),
    "liger": ("Liger LigerFusedLinearDPOLoss (torch.compile)", ("dpo",), False),
    "liger_eager": ("Liger LigerFusedLinearDPOLoss (compiled=False)", ("dpo",), False),
    "cce": ("Cut Cross-Entropy linear_cross_entropy(reduction='none')", ("dpo", "upo"), True),
    "ours_torch": ("upo.fused_loss backend='torch' (chunked PyTorch)", ("dpo", "upo"), False),
    "ours_triton": ("upo.fused_loss backend='triton'", ("dpo", "upo"), True),
    "ours_torch_bigtiles": ("upo_kernels.linear_logprobs backend='torch', 4096 x 4096 tiles (tuning probe)",
                            ("dpo", "upo"), False),
    "ours_triton_cublas_fwd": ("upo.fused_loss backend='triton', UPO_FWD_IMPL=cublas (forward probe)",
                               ("dpo", "upo"), True),
    "ours_triton_input_logits": ("upo.fused_loss backend='triton', UPO_FWD_IMPL=cublas UPO_LOGITS=input (probe)",
                                 ("dpo", "upo"), True),
    "ours_triton_pick": ("upo.fused_loss backend='triton' under the kernel probe's pick (knobs in the note)",
                         ("dpo", "upo"), True),
}

# Environment the probe variants of ours_triton run under, for the whole fwd+bwd (the kernels read
# UPO_FWD_IMPL / UPO_LOGITS at the forward, UPO_GROUP_MB / UPO_TILE_MB when they tile, backward too).
# ours_triton_pick's comes from the kernel probe (run_gpu.py --pick-env, set_pick_env).
OURS_ENV = {
    "ours_triton_cublas_fwd": {"UPO_FWD_IMPL": "cublas"},
    "ours_triton_input_logits": {"UPO_FWD_IMPL": "cublas", "UPO_LOGITS": "input"},
    "ours_triton_pick": {},
}


def set_pick_env(env: dict):
    """The knobs ``ours_triton_pick`` runs under (empty: the peer is skipped)."""
    OURS_ENV["ours_triton_pick"] = dict(env)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

BIG_TILES = (4096, 4096)

# Notes that go with a peer's numbers in every report.
PEER_NOTES = {
    "trl_chunked": "outputs=() (log-probs only; DPOTrainer also asks for entropy/mean_logits/is_top1), "
                   "chunk_size = TRL's _CHUNKED_LOGPROB_CHUNK_SIZE",
    "liger": "computes the reference log-probs itself from ref_input (one extra no-grad N.D.V matmul "
             "per call): LigerFusedLinearDPOLoss cannot take precomputed reference log-probs",
    "liger_eager": "as liger, compiled=False",
    "cce": "default filter_eps='high' (gradient filtering: approximate gradients by design)",
    "ours_triton_cublas_fwd": "not the library default: the forward as cuBLAS fp32 logit tiles + a Triton "
                              "logsumexp epilogue instead of the fused Triton kernel",
    "ours_triton_input_logits": "not the library default: as ours_triton_cublas_fwd with the logit tiles "
                                "rounded to bf16 by cuBLAS in both passes (the naive path's numerics)",
    "ours_triton_pick": "not the library default: the fastest accurate, lean variant of the kernel probe "
                        "(benchmarks/pick_default.py)",
    "ours_torch_bigtiles": f"not the library default: chunk_tokens={BIG_TILES[0]}, chunk_vocab={BIG_TILES[1]} "
                           "passed to upo_kernels.linear_logprobs, sums and loss head as for naive",
}

UPO_OPTIONS = {"loss_type": ["sigmoid", "upo"]}


# ----------------------------------------------------------------------------- loss heads
def dpo_from_sums(S, R, beta):
    """Sigmoid DPO, mean over pairs; rows [0, B) chosen, [B, 2B) rejected."""
    B = S.shape[0] // 2
    margin = (S[:B] - R[:B]) - (S[B:] - R[B:])
    return -F.logsigmoid(beta * margin).mean()


def upo_from_sums(S, inputs):
    import upo

    B = S.shape[0] // 2
    R, n, a = inputs["ref_logps"], inputs["lengths"], inputs["aux_rewards"]
    out = upo.loss(S[:B], S[B:], R[:B], R[B:], beta=inputs["beta"], chosen_lengths=n[:B],
                   rejected_lengths=n[B:], aux_rewards_chosen=a[:B], aux_rewards_rejected=a[B:],
                   **UPO_OPTIONS)
    return out.loss


def head(S, inputs, loss_kind):
    if loss_kind == "dpo":
        return dpo_from_sums(S, inputs["ref_logps"], inputs["beta"])
    if loss_kind == "upo":
        return upo_from_sums(S, inputs)
    raise ValueError(f"unknown loss kind {loss_kind!r}")


def _flat(inputs):
    h = inputs["hidden"]
    return h.reshape(-1, h.shape[-1]), inputs["weight"], inputs["labels"].reshape(-1)


def _sums(logp, inputs):
    rows = inputs["labels"].shape[0]
    return logp.float().view(rows, -1).sum(1)


# ----------------------------------------------------------------------------- imports
def _import_trl_utils():
    from trl.trainer import utils as trl_utils  # noqa: F401  (pulls accelerate, datasets, ...)

    return trl_utils


def _import_trl_chunked():
    """(ChunkedLogProbFunction, chunk_size, note). Falls back to loading the module by path
    when the trl package's trainer utilities cannot be imported (a missing heavy dependency):
    its backward then finds ``maybe_gather_lm_head_ctx`` as TRL defines it without DeepSpeed."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    try:
        trl_utils = _import_trl_utils()
        return ChunkedLogProbFunction, int(getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)), ""
    except Exception as exc:  # noqa: BLE001 - any import failure of the heavy part
        if "trl.trainer.utils" in sys.modules:
            raise
        import contextlib

        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = stub
        note = (f"trl.trainer.utils not importable ({type(exc).__name__}: {exc}); its "
                "maybe_gather_lm_head_ctx taken as the no-DeepSpeed nullcontext")
        return ChunkedLogProbFunction, 32768, note


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def availability(peer: str, device) -> tuple[bool, str]:
    """(usable, reason-if-not) for ``peer`` on ``device`` (checked by importing, nothing run)."""
    device = torch.device(device)
    _, _, needs_cuda = PEERS[peer]
    ours_triton = peer == "ours_triton" or peer in OURS_ENV
    if needs_cuda and device.type != "cuda" and not (ours_triton and _interpreting()):
        return False, "needs CUDA"  # ours_triton* run on CPU under TRITON_INTERPRET=1 (dry runs)
    if peer == "ours_triton_pick" and not OURS_ENV[peer]:
        return False, "no pick: the kernel probe's fastest accurate variant is the default, or no probe ran"
    try:
        if peer == "naive":
            pass
        elif peer == "trl_selective":
            _import_trl_utils().selective_log_softmax  # noqa: B018
        elif peer == "trl_chunked":
            _import_trl_chunked()
        elif peer in ("liger", "liger_eager"):
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: F401
        elif peer == "cce":
            from cut_cross_entropy import linear_cross_entropy  # noqa: F401
        elif peer == "ours_torch_bigtiles":
            from upo_kernels import linear_logprobs  # noqa: F401
        elif peer in ("ours_torch", "ours_triton") or peer in OURS_ENV:
            import upo  # noqa: F401
            from upo import fused_loss  # noqa: F401
            if peer != "ours_torch":
                importlib.import_module("upo_kernels.triton_ops")
    except Exception as exc:  # noqa: BLE001
        return False, f"not installed or not importable: {type(exc).__name__}: {exc}"
    return True, ""


# ----------------------------------------------------------------------------- adapters
def _naive(inputs, loss_kind):
    h, W, y = _flat(inputs)
    keep = y != -100
    safe = torch.where(keep, y, torch.zeros_like(y))

    def step():
        logits = h @ W.t()
        logp = logits.float().log_softmax(-1).gather(-1, safe[:, None]).squeeze(1)
        S = _sums(logp * keep, inputs)
        return head(S, inputs, loss_kind), S

    return step, ""


def _trl_selective(inputs, loss_kind):
    selective_log_softmax = _import_trl_utils().selective_log_softmax
    h, W, y = _flat(inputs)

    def step():
        logits = h @ W.t()
        logp = selective_log_softmax(logits, y)
        S = _sums(logp, inputs)
        return head(S, inputs, loss_kind), S

    return step, ""


def _trl_chunked(inputs, loss_kind):
    fn, chunk_size, note = _import_trl_chunked()
    h, W, y = _flat(inputs)
    params = list(inspect.signature(fn.forward).parameters)[1:]  # drop ctx
    args = {"hidden": h, "weight": W, "bias": None, "targets": y, "temperature": 1.0,
            "chunk_size": chunk_size, "final_logit_softcapping": None, "logit_scale": 1.0, "outputs": ()}
    positional = [args[p] for p in params if p in args]

    def step():
        logp = fn.apply(*positional)[0]
        S = _sums(logp, inputs)
        return head(S, inputs, loss_kind), S

    return step, note


def _liger(inputs, loss_kind, compiled=True):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    wanted = dict(ignore_index=-100, beta=inputs["beta"], compute_nll_loss=False, compiled=compiled,
                  use_ref_model=True, average_log_prob=False, chunk_size=1, loss_type="sigmoid")
    accepted = inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters
    module = LigerFusedLinearDPOLoss(**{k: v for k, v in wanted.items() if k in accepted})
    h, W, y = inputs["hidden"], inputs["weight"], inputs["labels"]
    ref_h = inputs["ref_hidden"]

    def step():
        out = module(W, h, y, bias=None, ref_input=ref_h, ref_weight=W.detach())
        loss, aux = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        S = torch.cat([aux[0], aux[1]]).detach().float() if aux is not None else None
        return loss, S

    return step, ""


def _cce(inputs, loss_kind):
    from cut_cross_entropy import linear_cross_entropy

    h, W, y = _flat(inputs)

    def step():
        nll = linear_cross_entropy(h, W, y, reduction="none")
        S = _sums(-nll.float(), inputs)
        return head(S, inputs, loss_kind), S

    return step, ""


def _ours(inputs, loss_kind, backend, env=None):
    import upo

    h, W, y = inputs["hidden"], inputs["weight"], inputs["labels"]
    R = inputs["ref_logps"]
    B = R.shape[0] // 2
    kwargs = dict(ref_chosen_logps=R[:B], ref_rejected_logps=R[B:], backend=backend, beta=inputs["beta"])
    if loss_kind == "dpo":
        kwargs["loss_type"] = "sigmoid"
    else:
        a = inputs["aux_rewards"]
        kwargs.update(UPO_OPTIONS, aux_rewards_chosen=a[:B], aux_rewards_rejected=a[B:])

    def step():
        return upo.fused_loss(h, W, y, **kwargs).loss, None

    step.env = dict(env or {})  # the harness sets it around forward and backward (_full_step)
    return step, format_env(env) if env else ""


def _ours_tiles(inputs, loss_kind, tiles=BIG_TILES):
    from upo_kernels import linear_logprobs

    h, W, y = _flat(inputs)

    def step():
        logp = linear_logprobs(h, W, y, backend="torch", chunk_tokens=tiles[0], chunk_vocab=tiles[1])
        S = _sums(logp, inputs)
        return head(S, inputs, loss_kind), S

    return step, ""


def build(peer: str, inputs, loss_kind: str):
    """-> (step, note). Raises NotImplementedError for an unsupported loss kind."""
    if loss_kind not in PEERS[peer][1]:
        raise NotImplementedError(f"{peer} does not implement the {loss_kind} loss")
    if peer == "naive":
        return _naive(inputs, loss_kind)
    if peer == "trl_selective":
        return _trl_selective(inputs, loss_kind)
    if peer == "trl_chunked":
        return _trl_chunked(inputs, loss_kind)
    if peer == "liger":
        return _liger(inputs, loss_kind, compiled=True)
    if peer == "liger_eager":
        return _liger(inputs, loss_kind, compiled=False)
    if peer == "cce":
        return _cce(inputs, loss_kind)
    if peer == "ours_torch":
        return _ours(inputs, loss_kind, "torch")
    if peer == "ours_triton":
        return _ours(inputs, loss_kind, "triton")
    if peer in OURS_ENV:
        return _ours(inputs, loss_kind, "triton", env=OURS_ENV[peer])
    if peer == "ours_torch_bigtiles":
        return _ours_tiles(inputs, loss_kind)
    raise KeyError(peer)


def versions() -> dict:
    """Versions of everything that can appear in a report (None: not installed)."""
    import platform

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name, dist in (("triton", "triton"), ("transformers", "transformers"), ("trl", "trl"),
                       ("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy"),
                       ("upo", "upo")):
        out[name] = _version(dist)
    if out["upo"] is None:
        try:
            import upo

            out["upo"] = getattr(upo, "__version__", None)
        except Exception:  # noqa: BLE001
            pass
    if importlib.util.find_spec("cut_cross_entropy") and out["cut_cross_entropy"] is None:
        try:
            out["cut_cross_entropy"] = importlib.import_module("cut_cross_entropy").__version__
        except Exception:  # noqa: BLE001
            pass
    return out
