"""upo.loss against TRL 1.16's own ``DPOTrainer._compute_loss`` on the same per-token inputs.

TRL's method runs unchanged on a trainer shell (``DPOTrainer.__new__`` plus the attributes its
``__init__`` would set) and on stub models that return chosen per-token log-probs, as TRL's fused
LM head does: 0 at masked positions. upo.loss gets the per-sequence quantities derived from the
same tokens (sums, counts, shared-token sums, WPO weights; docs/losses.md). Compared: the loss,
TRL's ``rewards/*`` and ``logps/*`` metrics, and d loss / d per-token log-probs on the response
tokens (TRL's unmasked sum also gives the stubs' masked positions a gradient).

Skipped, with the reason, where TRL 1.16 is not installed (``pip install -e .[dev]`` has it).
Inputs are fresh each run (UPO_TEST_SEED replays one, as in test_losses).
"""
import collections
import os
import random
from types import SimpleNamespace

import pytest
import torch

import loss_oracle as oracle
import upo

trl = pytest.importorskip("trl", reason="TRL is not installed: the parity tests need trl==1.16.0 (the dev extra)")
if not trl.__version__.startswith("1.16."):
    pytest.skip(f"parity is defined against TRL 1.16, found {trl.__version__}", allow_module_level=True)
from trl import DPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

RUN_SEED = int(os.environ.get("UPO_TEST_SEED", random.randrange(2**31)))
F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=2e-5, atol=2e-6)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")
MAX_ERRORS = collections.defaultdict(float)  # largest |upo - TRL| per quantity, printed at the end


def tokens_for(seed, batch, dtype=torch.float64, empty_prompt=False):
    print(f"inputs from seed {seed} (UPO_TEST_SEED={RUN_SEED} replays this run)")
    return oracle.token_batch(torch.Generator().manual_seed(seed), batch=batch, width=9 + batch % 4, dtype=dtype,
                              empty_prompt=empty_prompt)


class _TrainingModule(torch.nn.Module):
    """Stands for ``trainer.model``, which _compute_loss only asks whether it trains or checkpoints."""

    is_gradient_checkpointing = False


def run_trl(tokens, *, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0, ld_alpha=None,
            use_weighting=False, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05,
            precompute=False):
    """TRL 1.16's ``_compute_loss``: (loss, metrics, d loss / d per-token policy log-probs)."""
    mask = tokens["completion_mask"]
    rows, width = mask.shape
    policy = tokens["policy_tokens"].detach().clone().requires_grad_(True)
    zeros = torch.zeros_like(policy)

    def policy_model(**kwargs):
        return FusedCausalLMOutput(log_probs=policy, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                                   log_sum_sq_probs=tokens["log_sum_sq_tokens"] if use_weighting else None)

    def ref_model(**kwargs):
        return FusedCausalLMOutput(log_probs=tokens["ref_tokens"])

    identity = lambda tensor: tensor  # noqa: E731 - one process
    trainer = DPOTrainer.__new__(DPOTrainer)
    vars(trainer).update(
        model=_TrainingModule(), ref_model=ref_model,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False, precompute_ref_logps=precompute, loss_types=list(loss_type),
        loss_weights=list(loss_weights or [1.0] * len(loss_type)), beta=beta, label_smoothing=label_smoothing,
        ld_alpha=ld_alpha, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        use_weighting=use_weighting, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )
    inputs = {"input_ids": torch.zeros(rows, width, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask}
    if precompute:  # what TRL's precompute caches: the reference sums, ld-weighted like the policy's
        ref = dict(tokens, policy_tokens=tokens["ref_tokens"])
        sums = derive(ref, rows // 2, ld_alpha)["policy_logps"].detach()
        inputs.update(ref_chosen_logps=sums[: rows // 2], ref_rejected_logps=sums[rows // 2:])
    loss = DPOTrainer._compute_loss(trainer, policy_model, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, policy)
    return loss.detach(), {key: values[-1] for key, values in trainer._metrics["train"].items()}, grad


def derive(tokens, batch, ld_alpha=None):
    """Per-sequence inputs of upo.loss from per-token ones, differentiable in the policy's tokens."""
    shift = tokens["completion_mask"][:, 1:].to(tokens["policy_tokens"].dtype)
    policy = tokens["policy_tokens"]
    counts = shift.sum(1)
    keep = torch.minimum(counts[:batch], counts[batch:]).repeat(2)
    shared = shift * (shift.cumsum(1) <= keep[:, None])
    out = {"policy_logps": (policy * shift).sum(1), "policy_shared": (policy * shared).sum(1),
           "ref_logps": (tokens["ref_tokens"] * shift).sum(1), "ref_shared": (tokens["ref_tokens"] * shared).sum(1),
           "counts": counts, "full_counts": tokens["completion_mask"].sum(1).clamp(min=1).to(policy.dtype)}
    with torch.no_grad():
        aligned = ((policy - tokens["log_sum_sq_tokens"]) * shift).sum(1)
        out["wpo"] = torch.exp(aligned / counts.clamp(min=1))
    if ld_alpha is not None:
        out["policy_logps"] = out["policy_shared"] + ld_alpha * (out["policy_logps"] - out["policy_shared"])
    return out


def run_upo(tokens, *, loss_type, ld_alpha=None, use_weighting=False, full_lengths=False, **kwargs):
    """upo.loss on the per-sequence values of ``tokens``: (loss, metrics, d loss / d per-token log-probs)."""
    batch = tokens["completion_mask"].shape[0] // 2
    policy = tokens["policy_tokens"].detach().clone().requires_grad_(True)
    values = derive(dict(tokens, policy_tokens=policy), batch)
    # the loop-derived values of loss_oracle.sequence_values: an independent check of derive()
    for key, name in (("policy_logps", "S"), ("ref_logps", "R"), ("policy_shared", "S_shared"),
                      ("ref_shared", "R_shared"), ("wpo", "w")):
        suffix = name[1:] if len(name) > 1 else ""
        both = torch.cat([tokens[f"{name[0]}_c{suffix}"], tokens[f"{name[0]}_r{suffix}"]])
        torch.testing.assert_close(values[key].detach().double(), both, rtol=1e-6, atol=1e-6)
    lengths = values["full_counts"] if full_lengths else values["counts"]
    half = lambda t: (t[:batch], t[batch:])  # noqa: E731
    args = dict(chosen_lengths=half(lengths)[0], rejected_lengths=half(lengths)[1])
    if ld_alpha is not None:
        args.update(ld_alpha=ld_alpha, chosen_shared_logps=half(values["policy_shared"])[0],
                    rejected_shared_logps=half(values["policy_shared"])[1],
                    ref_chosen_shared_logps=half(values["ref_shared"])[0],
                    ref_rejected_shared_logps=half(values["ref_shared"])[1])
    if use_weighting:
        args.update(use_weighting=True, chosen_wpo_weights=half(values["wpo"])[0],
                    rejected_wpo_weights=half(values["wpo"])[1])
    out = upo.loss(*half(values["policy_logps"]), *half(values["ref_logps"]), loss_type=loss_type, **args,
                   **kwargs)
    (grad,) = torch.autograd.grad(out.loss, policy)
    return out.loss.detach(), out.metrics, grad


def compare(tokens, *, tolerance=F64, **case):
    upo_case = {key: value for key, value in case.items() if key not in ("precompute", "discopop_tau")}
    if "discopop_tau" in case:
        upo_case["discopop_tau"] = case["discopop_tau"]
    full = bool({"ipo", "sigmoid_norm"} & set(case["loss_type"]))  # TRL divides by the un-shifted count there
    if "exo_pair" in case["loss_type"]:  # TRL builds exo_pair's epsilon as a float32 tensor: log(eps) in float32
        tolerance = dict(rtol=max(tolerance["rtol"], 1e-6), atol=max(tolerance["atol"], 1e-8))
    trl_loss, trl_metrics, trl_grad = run_trl(tokens, **case)
    loss, metrics, grad = run_upo(tokens, full_lengths=full, **upo_case)
    shift = tokens["completion_mask"][:, 1:].bool()
    torch.testing.assert_close(loss.double(), trl_loss.double(), **tolerance)
    torch.testing.assert_close(grad[shift].double(), trl_grad[shift].double(), **tolerance)
    kind = str(tokens["policy_tokens"].dtype).replace("torch.", "") + (", exo_pair" if "exo_pair" in case["loss_type"]
                                                                     else "")
    errors = {"loss": abs(loss.double() - trl_loss.double()).item(),
              "grad": (grad[shift].double() - trl_grad[shift].double()).abs().max().item()}
    for key in METRICS:
        # TRL takes the accuracy through float32 (.float()); upo stays in the compute dtype
        rel = 1e-7 if key == "rewards/accuracies" else tolerance["rtol"] * 10
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=rel, abs=tolerance["atol"] * 10), key
        errors[key] = abs(metrics[key] - trl_metrics[key])
    for key, error in errors.items():
        MAX_ERRORS[f"{key} ({kind})"] = max(MAX_ERRORS[f"{key} ({kind})"], error)
    return loss


ALL_TRL = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
           "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.2}
SEEDS = [0, RUN_SEED]


@pytest.mark.parametrize("seed", SEEDS, ids=["seed0", "seed-fresh"])
@pytest.mark.parametrize("batch", [1, 3, 6])
@pytest.mark.parametrize("name", ALL_TRL)
def test_every_trl_loss_type(name, batch, seed):
    tokens = tokens_for(seed + batch, batch)
    eps = SMOOTHING.get(name, 0.0)
    # eps also given to sigmoid: TRL 1.16 ignores it there, and so must upo
    compare(tokens, loss_type=[name], label_smoothing=eps or (0.3 if name == "sigmoid" else 0.0), beta=0.3)


CASES = {
    "rpo": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "discopop-tau": dict(loss_type=["discopop"], discopop_tau=0.2, beta=0.5),
    "precompute": dict(loss_type=["sigmoid", "ipo"], precompute=True),
    "ld-sigmoid": dict(loss_type=["sigmoid"], ld_alpha=0.5),
    "ld-ipo": dict(loss_type=["ipo"], ld_alpha=0.3),
    "ld-sft-unweighted": dict(loss_type=["sigmoid", "sft"], ld_alpha=0.2),
    "ld-aot": dict(loss_type=["aot", "apo_down"], ld_alpha=0.7, label_smoothing=0.1),
    "ld-zero": dict(loss_type=["sigmoid_norm", "nca_pair"], ld_alpha=0.0),
    "ld-precompute": dict(loss_type=["hinge"], ld_alpha=0.4, precompute=True),
    "wpo-sigmoid": dict(loss_type=["sigmoid"], use_weighting=True),
    "wpo-ipo-apo": dict(loss_type=["ipo", "apo_zero"], use_weighting=True, loss_weights=[1.0, 3.0]),
    "wpo-ld": dict(loss_type=["robust"], use_weighting=True, ld_alpha=0.6, label_smoothing=0.2),
    "forward-kl": dict(loss_type=["sigmoid", "hinge"], f_divergence_type="forward_kl"),
    "forward-kl-robust": dict(loss_type=["robust", "exo_pair"], f_divergence_type="forward_kl",
                              label_smoothing=0.05),
    "forward-kl-ipo-norm": dict(loss_type=["ipo", "sigmoid_norm"], f_divergence_type="forward_kl"),
    "js-ipo": dict(loss_type=["ipo"], f_divergence_type="js_divergence"),
    "js-norm-sft": dict(loss_type=["sigmoid_norm", "sft"], f_divergence_type="js_divergence"),
    "js-ld-wpo": dict(loss_type=["discopop"], f_divergence_type="js_divergence", ld_alpha=0.5, use_weighting=True),
    "alpha-one": dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
}


@pytest.mark.parametrize("seed", SEEDS, ids=["seed0", "seed-fresh"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_options_and_combinations(case, seed):
    compare(tokens_for(seed + 7, 5), **CASES[case])


# TRL's alpha-divergence raises KeyError for float64 log-ratios, so these run in float32.
ALPHA_CASES = {
    "sigmoid_norm-0.3": dict(loss_type=["sigmoid_norm"], f_alpha_divergence_coef=0.3),
    "ipo-1.7": dict(loss_type=["ipo"], f_alpha_divergence_coef=1.7),
    "sigmoid-hinge-0.5": dict(loss_type=["sigmoid", "hinge"]),
    "robust-ld-wpo-0.2": dict(loss_type=["robust"], f_alpha_divergence_coef=0.2, ld_alpha=0.5, use_weighting=True,
                              label_smoothing=0.1),
}


@pytest.mark.parametrize("seed", SEEDS, ids=["seed0", "seed-fresh"])
@pytest.mark.parametrize("case", sorted(ALPHA_CASES))
def test_alpha_divergence_in_float32(case, seed):
    tokens = tokens_for(seed + 11, 4, dtype=torch.float32)
    compare(tokens, tolerance=F32, f_divergence_type="alpha_divergence", **ALPHA_CASES[case])


def test_alpha_divergence_exponent_cap_as_trl():
    # rejected log-ratios far below 0 with coef 0 push (a - 1) rho past the cap of 80
    tokens = tokens_for(RUN_SEED, 3, dtype=torch.float32)
    shift = tokens["completion_mask"][:, 1:].bool()
    tokens["policy_tokens"] = torch.where(shift, tokens["policy_tokens"] - 15.0, 0.0)
    for key, value in oracle.sequence_values(tokens, 3).items():
        tokens[key] = value
    compare(tokens, tolerance=F32, loss_type=["sigmoid"], f_divergence_type="alpha_divergence",
            f_alpha_divergence_coef=0.0)


def test_empty_prompt_needs_trl_counts_for_ipo():
    """An empty prompt: TRL's ipo/sigmoid_norm divide by the un-shifted count (one more than upo's n)."""
    tokens = tokens_for(RUN_SEED, 3, empty_prompt=True)
    compare(tokens, loss_type=["ipo", "sigmoid_norm"])  # with TRL's counts: equal
    trl_loss, _, _ = run_trl(tokens, loss_type=["ipo", "sigmoid_norm"])
    shifted_loss, _, _ = run_upo(tokens, loss_type=["ipo", "sigmoid_norm"])  # fused_loss's counts
    assert not torch.allclose(shifted_loss, trl_loss)


def test_report_max_errors():
    """Runs last in this module: prints the largest deviations from TRL seen above."""
    for key, value in sorted(MAX_ERRORS.items()):
        print(f"max |upo - TRL 1.16| {key}: {value:.1e}")
